"""TDMRep in EPUB publications: `tdm:reservation` and `tdm:policy` in the package document.

TDMRep ("TDM Metadata in EPUB 3 files", "... in EPUB 2 files"): an EPUB 3 package document
declares the prefix (`<package prefix="tdm: http://www.w3.org/ns/tdmrep#">`) and says
`<meta property="tdm:reservation">1</meta>` and `<meta property="tdm:policy">URL</meta>` in its
metadata; an EPUB 2 one says `<meta name="tdm:reservation" content="1"/>`. Either covers every
resource of the publication. Publishers put it there (the TDMRep group came out of publishing);
signals `tdm-epub:*`.

An EPUB is a ZIP file (OCF 3.x): its first entry is `mimetype`, stored, saying
`application/epub+zip`; `META-INF/container.xml` names the package documents (`rootfile
full-path`, usually one). The body is read as it arrives, local file header by local file header
(the central directory at its end is not waited for: a book is often tens of megabytes of images,
and the package document comes near the start). Only `container.xml` and package documents
(`*.opf`) are kept, each capped; other entries are skipped, a deflated one of unknown size
(a data descriptor follows it) by inflating it to its end, its output counted and thrown away.
A stored entry of unknown size ends where a data descriptor gives the size and CRC of what came
before it. What cannot be read (an encrypted package, an unknown compression method, a limit
passed) ends the scan, and the record says so (`epub:unread`).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from xml.parsers import expat

from proxy import optout
from proxy import tdmrep
from proxy import untrusted_xml
from proxy.optout import Kind
from proxy.optout import OptOutSignal
from proxy.stepscan import ScanError
from proxy.stepscan import StepScanner

MEDIA_TYPE = "application/epub+zip"
# OCF: the first entry is `mimetype`, stored, no extra field, its content the media type: the
# first 58 bytes of every EPUB are a local file header and these.
_LOCAL = b"PK\x03\x04"
_MIMETYPE_AT = 30
_MIMETYPE = b"mimetype" + MEDIA_TYPE.encode()
SNIFF_BYTES = _MIMETYPE_AT + len(_MIMETYPE)

CONTAINER = "META-INF/container.xml"
MAX_SCAN = 16 * 2**20  # body bytes read before giving up
MAX_DOCUMENT = 2 * 2**20  # one package document (or container.xml), inflated
MAX_DOCUMENTS = 8  # package documents kept while container.xml is still to come
MAX_INFLATED = 64 * 2**20  # entries inflated only to find their end, their output thrown away

# TDMRep's IRI for the EPUB 3 prefix; the XMP namespace (slash) is accepted as well.
TDM_IRIS = frozenset({"http://www.w3.org/ns/tdmrep#", "http://www.w3.org/ns/tdmrep/"})

_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a local file header, 30 bytes
_FLAG_ENCRYPTED = 0x1
_FLAG_DESCRIPTOR = 0x8
_STORED, _DEFLATED = 0, 8
_ZIP64 = 0xFFFFFFFF
_DESCRIPTOR = b"PK\x07\x08"
_NEXT = (_LOCAL, b"PK\x01\x02")  # what follows an entry: another, or the central directory


def maybe_epub(prefix: bytes) -> bool:
    """Whether a body beginning with these bytes may be an EPUB (a ZIP's first header)."""
    return prefix[:4] == _LOCAL[: len(prefix)]


def is_epub(prefix: bytes, content_type: str | None = None) -> bool | None:
    """Whether the body is an EPUB, from its first SNIFF_BYTES bytes; None: more are needed.

    OCF wants `mimetype` first, stored, with no extra field; zip tools often deflate it, give
    it an extra field or put it later, and e-readers open such books all the same. So a ZIP
    whose first entry is named `mimetype`, or one served as application/epub+zip, is read as
    an EPUB too: its package document's reservation binds as a conforming book's does."""
    if not maybe_epub(prefix):
        return False
    if len(prefix) < SNIFF_BYTES:
        return None
    if prefix[_MIMETYPE_AT:SNIFF_BYTES] == _MIMETYPE:
        return True
    first_named_mimetype = prefix[26:28] == b"\x08\x00" and prefix[30:38] == b"mimetype"
    return first_named_mimetype or optout.mime_type(content_type) == MEDIA_TYPE


@dataclass(slots=True)
class EpubPackage:
    """The package documents of one EPUB, as far as the scan got."""

    documents: list[bytes] = field(default_factory=list)
    complete: bool = False  # every package document container.xml names was read
    error: str | None = None  # why not


@dataclass(slots=True)
class _Entry:
    name: str
    method: int
    size: int | None  # compressed size; None: unknown until a data descriptor ends it
    zip64: bool
    wanted: bool
    descriptor: bool  # a data descriptor follows the data


class _Unreadable(ScanError):
    pass


class EpubScanner(StepScanner):
    """Feed the decoded body in chunks; `feed()` returns True once the package is known.

    States: header, sized, inflate, stored, descriptor."""

    def __init__(self, *, max_scan: int = MAX_SCAN):
        super().__init__("header", max_scan=max_scan)
        self.result = EpubPackage()
        self._entry: _Entry | None = None  # the entry being (or last) read or skipped
        self._inflater: Any = None  # zlib's decompressobj, for an entry of unknown size
        self._inflated = 0  # bytes inflated only to find entries' ends
        self._out: list[bytes] = []  # a wanted entry's inflated data so far
        self._out_size = 0
        self._stored = 0  # bytes of a stored entry of unknown size passed over so far
        self._stored_crc = 0  # and their CRC-32
        self._rootfiles: list[str] | None = None  # from container.xml, once read
        self._documents: dict[str, bytes] = {}  # package documents read, by entry name

    def finish(self) -> EpubPackage:
        """The result; call at the end of the body if `feed()` never returned True."""
        if not self.done:
            entry = self._entry
            inside = entry is not None and (self._state != "header" or self._skip)
            self._finish(f"the body ended inside {entry.name}" if entry and inside else None)
        return self.result

    # -- machinery -------------------------------------------------------------------------

    def _stop(self, error: str) -> None:
        self._finish(error)

    def _not_found(self, limit: int) -> str:
        return f"the package document was not found within {limit} bytes"

    def _finish(self, error: str | None) -> None:
        """Done: the package documents container.xml names (every one read, if it was), else
        whatever package documents were read."""
        named = self._rootfiles or []
        found = [self._documents[name] for name in named if name in self._documents]
        complete = bool(named) and len(found) == len(named) and error is None
        if error is None and not complete:
            if self._rootfiles is None:
                error = f"no {CONTAINER}"
            elif not named:
                error = f"{CONTAINER} names no package document"
            else:
                missing = [name for name in named if name not in self._documents]
                error = f"the package document {missing[0]} was not found"
        self.result.documents = found or list(self._documents.values())
        self.result.complete = complete
        self.result.error = error
        self.done = True
        self._buf = bytearray()
        self._inflater = None
        self._out = []

    def _step_header(self) -> bool:
        buf = self._buf
        if len(buf) < 4:
            return False
        if buf[:4] != _LOCAL:
            # The central directory (or anything else): no entries follow.
            self._finish(None)
            return True
        if len(buf) < _HEADER.size:
            return False
        (_, _, flags, method, _, _, _, csize, _, name_len, extra_len) = _HEADER.unpack_from(buf)
        end = _HEADER.size + name_len + extra_len
        if len(buf) < end:
            return False
        name = bytes(buf[_HEADER.size : _HEADER.size + name_len]).decode("utf-8", "replace")
        extra = bytes(buf[_HEADER.size + name_len : end])
        del buf[:end]
        zip64 = csize == _ZIP64
        size = _zip64_compressed_size(extra) if zip64 else csize
        descriptor = bool(flags & _FLAG_DESCRIPTOR)
        wanted = self._wanted(name)
        if wanted and flags & _FLAG_ENCRYPTED:
            raise _Unreadable(f"{name} is encrypted")
        if method not in (_STORED, _DEFLATED) and (wanted or descriptor or size is None):
            raise _Unreadable(f"{name} is compressed with method {method}, which is not read")
        if descriptor or size is None:
            size = None  # its sizes come after its data
        self._entry = _Entry(name, method, size, zip64, wanted, descriptor)
        self._out, self._out_size = [], 0
        if size is None and method == _DEFLATED:
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            self._state = "inflate"  # its end is found by inflating it
        elif size is None:
            self._stored, self._stored_crc = 0, 0
            self._state = "stored"  # its end is found by its data descriptor
        elif wanted:
            self._state = "sized"
        else:
            self._state = "descriptor" if descriptor else "header"
            self._drop(size)
        return True

    def _wanted(self, name: str) -> bool:
        if name == CONTAINER:
            return True
        if self._rootfiles is not None:
            return name in self._rootfiles
        return name.lower().endswith(".opf") and len(self._documents) < MAX_DOCUMENTS

    def _step_sized(self) -> bool:
        """A wanted entry whose compressed size the header gave: read it whole."""
        entry = self._entry
        assert entry is not None and entry.size is not None
        if entry.size > MAX_DOCUMENT:
            raise _Unreadable(f"{entry.name} is larger than {MAX_DOCUMENT} bytes")
        data = self._take(entry.size)
        if data is None:
            return False
        if entry.method == _DEFLATED:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                data = inflater.decompress(data, MAX_DOCUMENT + 1)
            except zlib.error as e:
                raise _Unreadable(f"{entry.name} does not inflate: {e}") from None
            if len(data) > MAX_DOCUMENT:
                raise _Unreadable(f"{entry.name} is larger than {MAX_DOCUMENT} bytes")
        self._state = "descriptor" if entry.descriptor else "header"
        self._keep(entry.name, data)
        return True

    def _step_inflate(self) -> bool:
        """An entry whose size comes after it: inflate to its end (kept only if wanted)."""
        entry = self._entry
        assert entry is not None
        inflater = self._inflater
        if not inflater.eof:
            data = bytes(self._buf)
            self._buf.clear()
            while data and not inflater.eof:
                try:
                    out = inflater.decompress(data, 2**20)
                except zlib.error as e:
                    raise _Unreadable(f"{entry.name} does not inflate: {e}") from None
                data = inflater.unconsumed_tail
                if entry.wanted:
                    self._out.append(out)
                    self._out_size += len(out)
                    if self._out_size > MAX_DOCUMENT:
                        raise _Unreadable(f"{entry.name} is larger than {MAX_DOCUMENT} bytes")
                else:
                    self._inflated += len(out)
                    if self._inflated > MAX_INFLATED:
                        raise _Unreadable(
                            f"the entries before the package document inflate to more than "
                            f"{MAX_INFLATED} bytes"
                        )
            if not inflater.eof:
                return False
            self._buf[:0] = inflater.unused_data + data
        self._inflater = None
        self._state = "descriptor"
        if entry.wanted:
            self._keep(entry.name, b"".join(self._out))
            self._out, self._out_size = [], 0
        return True

    def _step_stored(self) -> bool:
        """A stored entry whose size comes after it: its data ends where a data descriptor
        (signature, CRC, sizes) gives the size and the CRC-32 of the bytes passed over since the
        header, and another entry or the central directory follows (data that merely holds the
        signature does not end it)."""
        entry = self._entry
        assert entry is not None
        buf = self._buf
        length = 24 if entry.zip64 else 16
        at = buf.find(_DESCRIPTOR)
        while at >= 0 and at + length + 4 <= len(buf):
            (crc,) = struct.unpack_from("<I", buf, at + 4)
            (size,) = struct.unpack_from("<Q" if entry.zip64 else "<I", buf, at + 8)
            if (
                size == self._stored + at
                and buf[at + length : at + length + 4] in _NEXT
                and crc == zlib.crc32(buf[:at], self._stored_crc)
            ):
                self._keep_stored(bytes(buf[:at]))
                del buf[: at + length]
                self._state = "header"
                if entry.wanted:
                    self._keep(entry.name, b"".join(self._out))
                return True
            at = buf.find(_DESCRIPTOR, at + 1)
        # Not yet: keep what could still begin a descriptor.
        passed = max(0, (at if at >= 0 else len(buf) - len(_DESCRIPTOR) + 1))
        self._keep_stored(bytes(buf[:passed]))
        self._stored_crc = zlib.crc32(buf[:passed], self._stored_crc)
        del buf[:passed]
        self._stored += passed
        return False

    def _keep_stored(self, data: bytes) -> None:
        entry = self._entry
        assert entry is not None
        if entry.wanted:
            self._out.append(data)
            self._out_size += len(data)
            if self._out_size > MAX_DOCUMENT:
                raise _Unreadable(f"{entry.name} is larger than {MAX_DOCUMENT} bytes")

    def _step_descriptor(self) -> bool:
        """The data descriptor after an entry: an optional signature, the CRC, then both sizes
        (64-bit ones after a ZIP64 header)."""
        entry = self._entry
        assert entry is not None
        length = 4 + (16 if entry.zip64 else 8)
        if len(self._buf) < 4:
            return False
        length += 4 * (self._buf[:4] == _DESCRIPTOR)
        if len(self._buf) < length:
            return False
        del self._buf[:length]
        self._state = "header"
        return True

    def _keep(self, name: str, data: bytes) -> None:
        if name == CONTAINER:
            self._rootfiles = rootfiles(data)
            for kept in [n for n in self._documents if n not in self._rootfiles]:
                del self._documents[kept]
        else:
            self._documents[name] = data
        if self._rootfiles is not None and all(n in self._documents for n in self._rootfiles):
            self._finish(None)


def _zip64_compressed_size(extra: bytes) -> int | None:
    """The compressed size in a ZIP64 extended information field (APPNOTE 4.5.3): after the
    uncompressed size, both present when the header's fields are 0xFFFFFFFF."""
    at = 0
    while at + 4 <= len(extra):
        kind, size = struct.unpack_from("<HH", extra, at)
        if kind == 0x0001 and size >= 16:
            return int(struct.unpack_from("<Q", extra, at + 12)[0])
        at += 4 + size
    return None


def scan_epub(body: bytes, *, max_scan: int = MAX_SCAN) -> EpubPackage:
    scanner = EpubScanner(max_scan=max_scan)
    scanner.feed(body)
    return scanner.finish()


# -- the XML -----------------------------------------------------------------------------------


def _local(name: str) -> str:
    return name.rsplit(" ", 1)[-1]


def rootfiles(container: bytes) -> list[str]:
    """The package documents `META-INF/container.xml` names (`<rootfile full-path=...>`)."""
    found: list[str] = []

    def start(name: str, attrs: dict[str, str]) -> None:
        if _local(name) == "rootfile" and attrs.get("full-path"):
            found.append(attrs["full-path"].lstrip("/"))

    parser = untrusted_xml.parser()
    parser.StartElementHandler = start
    try:
        parser.Parse(container, True)
    except (expat.ExpatError, ValueError):
        pass  # what was read before the error stands
    return found


class _PackageReader:
    """`tdm:reservation` and `tdm:policy` in one package document's metadata."""

    def __init__(self) -> None:
        self.reservations: list[int] = []
        self.policy: str | None = None
        self._prefixes: dict[str, str] = {}
        self._property: str | None = None  # an EPUB 3 meta whose text is being read
        self._text: list[str] = []

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        local = _local(name)
        if local == "package":
            self._prefixes = _prefixes(attrs.get("prefix", ""))
        elif local == "meta":
            term = self._term(attrs.get("property", ""))
            if term:
                self._property, self._text = term, []
            elif attrs.get("name", "").strip().lower() in ("tdm:reservation", "tdm:policy"):
                self._value(attrs["name"].strip().lower()[4:], attrs.get("content", ""))

    def _term(self, prop: str) -> str | None:
        """The term ("reservation", "policy") of a property in TDMRep's vocabulary, else None. The
        `tdm` prefix counts undeclared too (TDMRep's examples are sometimes copied without it);
        declared, it must be TDMRep's IRI."""
        prefix, _, reference = prop.strip().partition(":")
        if reference not in ("reservation", "policy"):
            return None
        iri = self._prefixes.get(prefix)
        if iri in TDM_IRIS or (iri is None and prefix == "tdm"):
            return reference
        return None

    def _end(self, name: str) -> None:
        if self._property is not None and _local(name) == "meta":
            self._value(self._property, "".join(self._text))
            self._property = None

    def _chars(self, data: str) -> None:
        if self._property is not None:
            self._text.append(data)

    def _value(self, term: str, value: str) -> None:
        if term == "reservation":
            if (reservation := tdmrep.parse_reservation(value)) is not None:
                self.reservations.append(reservation)
        elif self.policy is None:
            self.policy = tdmrep.parse_policy(value)

    def read(self, document: bytes) -> None:
        parser = untrusted_xml.parser()
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._chars
        try:
            parser.Parse(document, True)
        except (expat.ExpatError, ValueError):
            self._fallback(document)

    def _fallback(self, document: bytes) -> None:
        """A document that is not well-formed XML: its reservation found as text, so that a
        sloppy writer's opt-out counts."""
        for match in _RESERVATION_TEXT.finditer(document):
            self.reservations.append(int(match.group(1)))


_RESERVATION_TEXT = re.compile(
    rb"tdm:reservation[\"']?\s*(?:>|content\s*=\s*[\"'])\s*([01])\b", re.IGNORECASE
)


def _prefixes(declaration: str) -> dict[str, str]:
    """An EPUB 3 `prefix` attribute: whitespace-separated `prefix: IRI` pairs."""
    parts = declaration.split()
    return {
        prefix[:-1]: iri
        for prefix, iri in zip(parts[::2], parts[1::2], strict=False)
        if prefix.endswith(":")
    }


def package_declaration(documents: list[bytes]) -> tdmrep.TdmDeclaration:
    """What the package documents declare: reserved if any says 1."""
    reader = _PackageReader()
    for document in documents:
        reader.read(document)
    return tdmrep.TdmDeclaration(max(reader.reservations, default=None), reader.policy)


def epub_signals(package: EpubPackage) -> list[OptOutSignal]:
    """The signals of one EPUB: its TDMRep declaration, and whether it could be read whole."""
    signals = optout.tdm_signals(package_declaration(package.documents), "tdm-epub")
    if not package.complete:
        signals.append(
            OptOutSignal(
                Kind.TDMREP,
                "epub:unread",
                False,
                f"the EPUB's package document was not read whole: {package.error}",
            )
        )
    return signals
