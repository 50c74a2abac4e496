"""TDMRep in EPUB publications: the package document read from the ZIP as it streams."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib

import pytest

from proxy import epub
from proxy.decision import Reason
from proxy.epub import EpubScanner
from proxy.epub import scan_epub
from proxy.optout_checks import BodyScan
from tests.optout_fixtures import TOKEN
from tests.optout_fixtures import epub as make_epub
from tests.optout_fixtures import epub_reservation
from tests.optout_fixtures import make_checks
from tests.optout_fixtures import make_policy
from tests.optout_fixtures import opf
from tests.optout_fixtures import request_context

POLICY = "https://publisher.test/tdm-policy.json"
# A book's images come before its package document in many files, and weigh most of it.
IMAGES = (("OEBPS/images/cover.jpg", os.urandom(60_000)), ("OEBPS/c1.xhtml", b"<p>x</p>" * 999))


def _before_last_entry(book: bytes) -> bytes:
    return book[: book.rfind(b"PK\x03\x04")]


def names(package: epub.EpubPackage) -> list[str]:
    return [s.name for s in epub.epub_signals(package)]


def in_pieces(body: bytes, size: int) -> epub.EpubPackage:
    scanner = EpubScanner()
    for at in range(0, len(body), size):
        if scanner.feed(body[at : at + size]):
            break
    return scanner.finish()


@pytest.mark.parametrize("descriptors", [False, True], ids=["sizes-first", "data-descriptors"])
@pytest.mark.parametrize("stored", [False, True], ids=["deflated", "stored"])
@pytest.mark.parametrize("package_first", [False, True], ids=["container-first", "package-first"])
def test_the_reservation_is_read_however_the_zip_is_laid_out(
    descriptors: bool, stored: bool, package_first: bool
) -> None:
    book = make_epub(
        epub_reservation("1", POLICY),
        before=IMAGES,
        descriptors=descriptors,
        stored=stored,
        package_first=package_first,
    )
    assert zipfile.ZipFile(io.BytesIO(book)).testzip() is None  # a ZIP any reader opens
    whole = scan_epub(book)
    assert whole.complete and whole.error is None
    assert names(whole) == ["tdm-epub:reserved", "tdm-epub:policy"]
    for size in (1, 7, 4096):
        pieces = in_pieces(book, size)
        assert (pieces.complete, names(pieces)) == (True, names(whole)), size


def test_the_scan_stops_at_the_package_document() -> None:
    book = make_epub(epub_reservation("1"), after=(("OEBPS/big.bin", os.urandom(2**20)),))
    scanner = EpubScanner()
    fed = 0
    for at in range(0, len(book), 4096):
        fed += 4096
        if scanner.feed(book[at : at + 4096]):
            break
    assert scanner.done and fed < 8192, fed  # not a byte of what follows is needed


@pytest.mark.parametrize(
    ("package", "expected"),
    [
        (epub_reservation("1"), ["tdm-epub:reserved"]),
        (epub_reservation("0"), ["tdm-epub:not-reserved"]),
        (epub_reservation("2"), []),  # a protocol error: unset
        (opf(""), []),
        # EPUB 2: name and content
        (opf('<meta name="tdm:reservation" content="1"/>', prefix=None), ["tdm-epub:reserved"]),
        # The prefix undeclared: TDMRep's `tdm` all the same.
        (opf('<meta property="tdm:reservation">1</meta>', prefix=None), ["tdm-epub:reserved"]),
        # Another prefix bound to TDMRep's IRI.
        (
            opf(
                '<meta property="t:reservation">1</meta>', prefix="t: http://www.w3.org/ns/tdmrep#"
            ),
            ["tdm-epub:reserved"],
        ),
        # `tdm` bound to another vocabulary: not TDMRep.
        (
            opf('<meta property="tdm:reservation">1</meta>', prefix="tdm: http://other.test/v#"),
            [],
        ),
        # Not well-formed: found as text.
        (epub_reservation("1").replace(b"</metadata>", b"<br></metadata>"), ["tdm-epub:reserved"]),
    ],
    ids=[
        "reserved",
        "not-reserved",
        "protocol-error",
        "none",
        "epub2",
        "undeclared-prefix",
        "other-prefix",
        "other-iri",
        "not-well-formed",
    ],
)
def test_package_declarations(package: bytes, expected: list[str]) -> None:
    assert names(scan_epub(make_epub(package))) == expected


def test_every_rendition_counts() -> None:
    book = make_epub(epub_reservation("0"), epub_reservation("1"))
    package = scan_epub(book)
    assert package.complete and len(package.documents) == 2
    assert names(package) == ["tdm-epub:reserved"]


def test_a_dtd_is_not_expanded() -> None:
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE package [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>'
        b'<package><metadata><meta property="tdm:reservation">1</meta><meta name="x" '
        b'content="&c;"/></metadata></package>'
    )
    package = scan_epub(make_epub(laughs))
    assert names(package) == ["tdm-epub:reserved"]  # read as text, nothing expanded


@pytest.mark.parametrize(
    ("book", "error"),
    [
        (_before_last_entry(make_epub(epub_reservation("1"), before=IMAGES)), "was not found"),
        (make_epub(epub_reservation("1"), names=("OEBPS/missing.opf",))[:400], "body ended"),
    ],
    ids=["cut-before-the-package", "cut-inside-an-entry"],
)
def test_a_cut_epub_says_its_package_went_unread(book: bytes, error: str) -> None:
    package = scan_epub(book)
    assert not package.complete and error in (package.error or "")
    assert "epub:unread" in names(package)


def test_an_encrypted_package_document_is_unread() -> None:
    book = bytearray(make_epub(epub_reservation("1")))
    header = book.find(b"PK\x03\x04", book.find(b"META-INF/container.xml"))
    book[header + 6] |= 0x1  # the package document's local header: encrypted
    package = scan_epub(bytes(book))
    assert (package.complete, package.error) == (False, "OEBPS/content.opf is encrypted")
    assert names(package) == ["epub:unread"]


def test_a_deflate_bomb_before_the_package_is_inflated_no_further_than_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(epub, "MAX_INFLATED", 8 * 2**20)
    bomb = ("OEBPS/zeros.bin", bytes(64 * 2**20))  # ~64 KiB deflated
    book = make_epub(epub_reservation("1"), before=(bomb,), descriptors=True)
    assert len(book) < 2**20
    package = scan_epub(book)
    assert not package.complete and "inflate to more than" in (package.error or "")


def test_stored_data_that_looks_like_a_descriptor_does_not_end_the_entry() -> None:
    # An empty entry's descriptor with no header after it; then one with the size of the data
    # before it and a header after it, but not the data's CRC.
    fake = b"PK\x07\x08" + bytes(12) + bytes(16)
    fake += b"PK\x07\x08" + bytes(4) + struct.pack("<II", 32, 32) + b"PK\x03\x04"
    before = (("OEBPS/fake.bin", fake * 50),)
    book = make_epub(epub_reservation("1"), before=before, descriptors=True, stored=True)
    package = in_pieces(book, 5)
    assert package.complete and names(package) == ["tdm-epub:reserved"]


def test_a_zip64_entry_before_the_package_is_passed_over() -> None:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w") as book:
        book.writestr(zipfile.ZipInfo("mimetype"), b"application/epub+zip")
        book.writestr("META-INF/container.xml", _container())
        with book.open("OEBPS/big.bin", "w", force_zip64=True) as big:
            big.write(os.urandom(100_000))
        book.writestr("OEBPS/content.opf", epub_reservation("1"))
    package = in_pieces(sink.getvalue(), 1000)
    assert package.complete and names(package) == ["tdm-epub:reserved"]


def _container() -> bytes:
    return (
        b'<container xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles>'
        b'<rootfile full-path="OEBPS/content.opf"/></rootfiles></container>'
    )


def test_other_zip_files_are_not_read() -> None:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w") as archive:
        archive.writestr("content.opf", epub_reservation("1"))
    scan = BodyScan("application/zip", [TOKEN])
    assert scan.feed(sink.getvalue()[:100])
    assert scan.epub_package is None and scan.image is None


async def test_a_reserved_epub_is_withheld_whatever_its_content_type() -> None:
    policy = make_policy()
    checks = make_checks(policy)
    ctx = request_context(policy, "https://site-a.test/book")
    book = make_epub(epub_reservation("1", POLICY), before=IMAGES)
    try:
        for ctype in ("application/epub+zip", "application/octet-stream", None):
            result = await checks.assess_response(ctx, 200, [], book, ctype)
            assert result.decision is not None, ctype
            assert result.decision.reason is Reason.TDM_RESERVED
            assert result.signals == ("tdm-epub:reserved", "tdm-epub:policy")
        free = await checks.assess_response(ctx, 200, [], make_epub(opf("")), None)
        assert free.decision is None and free.signals == ()
        gzipped = zlib.compress(book)
        assert gzipped  # (a body in a Content-Encoding is decoded before the scan: elsewhere)
    finally:
        await checks.close()


def _book(*, mimetype_method: int, mimetype_first: bool) -> bytes:
    """A book as zip tools write it: `mimetype` deflated, or not the first entry."""
    sink = io.BytesIO()
    container = (
        b'<?xml version="1.0"?><container version="1.0" '
        b'xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles>'
        b'<rootfile full-path="OEBPS/content.opf"/></rootfiles></container>'
    )
    mimetype = zipfile.ZipInfo("mimetype")
    mimetype.compress_type = mimetype_method
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as archive:
        if mimetype_first:
            archive.writestr(mimetype, b"application/epub+zip")
        archive.writestr("META-INF/container.xml", container)
        archive.writestr("OEBPS/content.opf", epub_reservation("1"))
        if not mimetype_first:
            archive.writestr(mimetype, b"application/epub+zip")
    return sink.getvalue()


@pytest.mark.parametrize(
    ("book", "content_types"),
    [
        # `mimetype` deflated: its name still says what the file is.
        (
            _book(mimetype_method=zipfile.ZIP_DEFLATED, mimetype_first=True),
            ("application/epub+zip", "application/octet-stream", None),
        ),
        # `mimetype` last: the Content-Type says it.
        (
            _book(mimetype_method=zipfile.ZIP_STORED, mimetype_first=False),
            ("application/epub+zip", "Application/EPUB+zip; charset=binary"),
        ),
    ],
    ids=["mimetype-deflated", "mimetype-last"],
)
async def test_a_book_not_laid_out_as_ocf_wants_is_read_all_the_same(
    book: bytes, content_types: tuple[str | None, ...]
) -> None:
    # Only a ZIP whose first 58 bytes were a stored `mimetype` entry was read as an EPUB: a
    # book from `zip -r` (e-readers open it) with tdm:reservation 1 was delivered with nothing
    # on its record (probe-optout).
    policy = make_policy()
    checks = make_checks(policy)
    ctx = request_context(policy, "https://site-a.test/book")
    try:
        for ctype in content_types:
            result = await checks.assess_response(ctx, 200, [], book, ctype)
            assert result.decision is not None, ctype
            assert result.decision.reason is Reason.TDM_RESERVED, ctype
            assert result.signals == ("tdm-epub:reserved",), ctype
    finally:
        await checks.close()
