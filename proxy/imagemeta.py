"""Opt-outs embedded in images: IPTC PLUS DataMining in XMP, and C2PA/CAWG training-mining.

What is read, and where (only the metadata, never the image data):

- JPEG: XMP in APP1 (`http://ns.adobe.com/xap/1.0/`, and extended XMP
  `http://ns.adobe.com/xmp/extension/` reassembled), the C2PA manifest store in APP11 JUMBF
  segments (ISO 19566-5, reassembled). Metadata precedes the image data: the scan stops at SOS.
- PNG: XMP in an iTXt (or tEXt/zTXt) chunk with keyword `XML:com.adobe.xmp`, the C2PA store in
  the `caBX` chunk. PNG puts no order on text chunks, and writers put XMP after the image data
  (ImageMagick, ExifTool before 11.63), so the scan walks every chunk header to IEND, skipping
  the image data without keeping it.
- WebP: the `XMP ` and `C2PA` chunks. The WebP container puts metadata after the image data,
  so the scan walks every chunk header to the end of the RIFF, skipping payloads without
  keeping them. A simple-format file (one VP8/VP8L chunk) has no metadata by the container
  spec, but the C2PA SDK signs one by appending a `C2PA` chunk, without VP8X: so it is walked
  to its end too.
- GIF, TIFF, AVIF/HEIF (ISO BMFF image brands), the JPEG XL container, SVG (XMP in its
  `<metadata>` element, also a bare `rdf:RDF` as Inkscape writes it, read with the namespaces
  its root declares; an SVG is known by its Content-Type, `image/svg+xml`, and its text), and
  PDF documents (not images, but TDMRep puts a PDF's reservation in its XMP): XMP by packet
  scanning (XMP Part 3, 1.1.3: the packet is stored as text, between `<?xpacket begin=` or
  `<x:xmpmeta` and their ends), to the end of the body, as such metadata may come after the
  image data. A C2PA manifest in an SVG (base64 text) is not read. Their
  C2PA store is found the same way, by its JUMBF description box, and read whole from the
  superbox around it (in a GIF, from the data sub-blocks it is spread over); one not laid out
  so is only noticed (`c2pa_unread`). XMP or a store kept compressed (a JPEG XL `brob` box, a
  PDF stream with a filter) is not seen.

TDMRep's XMP properties (`tdm:reservation`, `tdm:policy`, namespace
`http://www.w3.org/ns/tdmrep/`) are read from any packet: signals `tdm-xmp:*`.

IPTC PLUS DataMining (namespace `http://ns.useplus.org/ldf/xmp/1.0/`, property `DataMining`,
values from the PLUS LDF vocabulary `http://ns.useplus.org/ldf/vocab/DMI-*`) is matched by
namespace URI, whatever the prefix, in attribute form (`plus:DataMining="..."`) and element form
(`<plus:DataMining>...</plus:DataMining>` or `rdf:resource`). Every `DMI-PROHIBITED*` value
prohibits AI training, including "except search engine indexing" and the "see ..." values.

C2PA manifests are read with c2pa-python from the extracted store alone (never the asset, and
with remote manifest fetching off): `c2pa.training-mining` and `cawg.training-mining`
assertions, where `notAllowed` and `constrained` for AI training, generative AI training or data
mining both mean no. The signature need not be trusted: an opt-out binds whoever signed it, and
an unsigned "allowed" would not be a licence anyway.

Memory is bounded: the scanner keeps only metadata payloads, each capped, and gives up after
`max_scan` bytes (`complete` is then False).
"""

from __future__ import annotations

import enum
import functools
import io
import json
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

PLUS_NS = "http://ns.useplus.org/ldf/xmp/1.0/"
PLUS_VOCAB = "http://ns.useplus.org/ldf/vocab/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
TDM_NS = "http://www.w3.org/ns/tdmrep/"  # TDMRep's XMP properties (TDMRep, "PDF documents")

# The PLUS LDF DataMining vocabulary (IPTC Photo Metadata Standard 2023.1, PLUS LDF 1.2.x).
DATA_MINING_VALUES: dict[str, str] = {
    "DMI-UNSPECIFIED": "Unspecified - no prohibition defined",
    "DMI-ALLOWED": "Allowed",
    "DMI-PROHIBITED-AIMLTRAINING": "Prohibited for AI/ML training",
    "DMI-PROHIBITED-GENAIMLTRAINING": "Prohibited for Generative AI/ML training",
    "DMI-PROHIBITED-EXCEPTSEARCHENGINEINDEXING": "Prohibited except for search engine indexing",
    "DMI-PROHIBITED": "Prohibited",
    "DMI-PROHIBITED-SEECONSTRAINT": "Prohibited, see plus:OtherConstraints",
    "DMI-PROHIBITED-SEEEMBEDDEDRIGHTSEXPR": "Prohibited, see iptcExt:EmbdEncRightsExpr",
    "DMI-PROHIBITED-SEELINKEDRIGHTSEXPR": "Prohibited, see iptcExt:LinkedEncRightsExpr",
}

MAX_SCAN = 16 * 2**20  # bytes examined before giving up
MAX_XMP = 2 * 2**20  # all XMP of one image, extended XMP included
MAX_C2PA = 8 * 2**20  # the C2PA manifest store

_XMP_JPEG = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_JPEG_EXT = b"http://ns.adobe.com/xmp/extension/\x00"
_XMP_PNG_KEYWORD = b"XML:com.adobe.xmp"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageFormat(enum.StrEnum):
    JPEG = "jpeg"
    PNG = "png"
    WEBP = "webp"
    # Formats whose metadata boxes, extensions or tags are not walked: their XMP is found by
    # packet scanning (XMP Part 3, 1.1.3), their C2PA store by its JUMBF description box.
    GIF = "gif"
    TIFF = "tiff"
    HEIF = "heif"  # AVIF, HEIC and the other image brands of the ISO base media file format
    JXL = "jxl"  # the JPEG XL container (a bare codestream carries no metadata)
    PDF = "pdf"  # no image, but its XMP (TDMRep's "PDF documents") is found the same way
    SVG = "svg"  # XMP in its <metadata> element: text, found the same way (by Content-Type)
    OTHER = "other"


_SIGNATURES = (
    (b"\xff\xd8", ImageFormat.JPEG),
    (_PNG_SIGNATURE, ImageFormat.PNG),
    (b"GIF87a", ImageFormat.GIF),
    (b"GIF89a", ImageFormat.GIF),
    (b"II*\x00", ImageFormat.TIFF),
    (b"MM\x00*", ImageFormat.TIFF),
    (b"II+\x00", ImageFormat.TIFF),  # BigTIFF
    (b"MM\x00+", ImageFormat.TIFF),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", ImageFormat.JXL),
    (b"%PDF-", ImageFormat.PDF),
)
_HEIF_BRANDS = frozenset(b"avif avis heic heix heim heis hevc hevx mif1 msf1 mif2 miaf".split())


# The first byte of every format sniffed: the signatures above, RIFF's "R", and an ISO BMFF
# file's ftyp box size (a few dozen bytes: its first byte is 0).
_FIRST_BYTES = frozenset({signature[0] for signature, _ in _SIGNATURES} | {ord("R"), 0})


def sniff(prefix: bytes) -> ImageFormat | None:
    """The format from the first bytes (12 suffice); None when more bytes are needed."""
    if not prefix:
        return None
    if prefix[0] not in _FIRST_BYTES:
        return ImageFormat.OTHER  # text, HTML, JSON...: at once
    for signature, fmt in _SIGNATURES:
        if prefix.startswith(signature):
            return fmt
        if len(prefix) < len(signature) and signature.startswith(prefix):
            return None
    if prefix.startswith(b"RIFF") or (len(prefix) < 4 and b"RIFF".startswith(prefix)):
        if len(prefix) < 12:
            return None
        if prefix[8:12] == b"WEBP":
            return ImageFormat.WEBP
        return ImageFormat.OTHER
    # ISO BMFF: a box size, then "ftyp" and the major brand.
    if len(prefix) < 12 and (len(prefix) <= 4 or b"ftyp".startswith(prefix[4:8])):
        return None
    if prefix[4:8] == b"ftyp" and prefix[8:12] in _HEIF_BRANDS:
        return ImageFormat.HEIF
    return ImageFormat.OTHER


_PACKET_SCANNED = frozenset(
    {
        ImageFormat.GIF,
        ImageFormat.TIFF,
        ImageFormat.HEIF,
        ImageFormat.JXL,
        ImageFormat.PDF,
        ImageFormat.SVG,
    }
)
# Where an XMP packet begins and ends (the wrapper, or the x:xmpmeta element, which is optional).
_PACKET_STARTS = (b"<?xpacket begin=", b"<x:xmpmeta")
_PACKET_ENDS = (b"</x:xmpmeta>", b"<?xpacket end=")
# In an SVG, also a bare rdf:RDF in <metadata>, as Inkscape writes it (both wrappers are
# optional); its namespaces are often declared on the root <svg> element, whose declarations
# are read first (within the first _SVG_ROOT_LIMIT bytes) and given to it.
_BARE_RDF = b"<rdf:RDF"
_BARE_RDF_END = b"</rdf:RDF>"
_SVG_PACKET_STARTS = (*_PACKET_STARTS, _BARE_RDF)
_SVG_ROOT_LIMIT = 64 * 1024
_SVG_ROOT = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?svg[\s>/]")
_XMLNS = re.compile(rb"""\sxmlns(?::[\w.-]+)?\s*=\s*(?:"[^"<]*"|'[^'<]*')""")
# A C2PA manifest store's JUMBF description box: its type, then the label's UUID.
_C2PA_STORE_MARK = b"jumdc2pa"
# Kept between chunks: enough for a marker cut in two, and for the 12 bytes that come before a
# store's description box (the superbox's size and type, and the description box's size; 13 in
# a GIF, with the sub-block's length byte).
_OVERLAP = max(*map(len, _PACKET_STARTS), 13 + len(_C2PA_STORE_MARK)) - 1


@dataclass(slots=True)
class ImageMetadata:
    """The metadata payloads of one image."""

    format: ImageFormat | None = None
    xmp: list[bytes] = field(default_factory=list)
    c2pa_store: bytes | None = None
    complete: bool = False  # the scan reached the end of the metadata
    truncated: bool = False  # some payload exceeded its cap and was skipped
    error: str | None = None
    c2pa_unread: bool = False  # a C2PA store was seen, but not laid out as one that is read


# -- the incremental scanner ---------------------------------------------------------------


class ImageMetadataScanner(StepScanner):
    """Feed the decoded body in chunks; `feed()` returns True once the metadata is known.

    Nothing of the image data is kept: at most the metadata payloads and one pending header.
    """

    def __init__(self, *, max_scan: int = MAX_SCAN, svg: bool = False):
        """`svg`: the body is an SVG image (known by its Content-Type: text is not sniffed)."""
        super().__init__("sniff", max_scan=max_scan)
        self.meta = ImageMetadata()
        self._xmp_bytes = 0
        self._extended: dict[bytes, dict[int, bytes]] = {}
        self._jumbf: dict[int, dict[int, bytes]] = {}
        self._riff_end = 0
        self._consumed = 0
        self._searched = 0  # in a packet being read: where its end was looked for up to
        self._store_seen = False  # a C2PA store was found by scanning (read, or noticed)
        self._store_parts: list[bytes] = []  # a GIF's store, sub-block by sub-block
        self._store_size = 0
        self._svg = svg
        self._svg_namespaces: bytes | None = None  # the root's declarations, once read
        if svg:
            self.meta.format = ImageFormat.SVG
            self._state = "packet_search"

    def finish(self) -> ImageMetadata:
        """The result; call at the end of the body if `feed()` never returned True."""
        if not self.done:
            if self._state == "packet_search":
                self._finish(complete=True)  # scanned to the end, no packet left open
            else:
                self.meta.error = self.meta.error or "the body ended inside the metadata"
                self._finish(complete=False)
        return self.meta

    # -- machinery -------------------------------------------------------------------------

    def _stop(self, error: str) -> None:
        self.meta.error = error
        self._finish(complete=False)

    def _not_found(self, limit: int) -> str:
        return f"metadata not found within the first {limit} bytes"

    def _finish(self, *, complete: bool) -> None:
        self.meta.complete = complete
        for parts in self._extended.values():
            packet = b"".join(parts[offset] for offset in sorted(parts))
            self.meta.xmp.append(packet)
        if self._jumbf:
            # One manifest store: the box instance with the most data (there is one in practice).
            segments = max(self._jumbf.values(), key=lambda s: sum(map(len, s.values())))
            self.meta.c2pa_store = b"".join(segments[z] for z in sorted(segments))
        self.done = True
        self._buf = bytearray()
        self._extended.clear()
        self._jumbf.clear()

    def _step_sniff(self) -> bool:
        fmt = sniff(bytes(self._buf[:12]))
        if fmt is None:
            return False
        self.meta.format = fmt
        if fmt is ImageFormat.JPEG:
            del self._buf[:2]
            self._state = "jpeg_marker"
        elif fmt is ImageFormat.PNG:
            del self._buf[:8]
            self._state = "png_chunk"
        elif fmt is ImageFormat.WEBP:
            (size,) = struct.unpack("<I", self._buf[4:8])
            self._riff_end = 8 + size
            del self._buf[:12]
            self._consumed = 12
            self._state = "chunk"
        elif fmt in _PACKET_SCANNED:
            self._state = "packet_search"  # to the end of the body: metadata may be anywhere
        else:
            self._finish(complete=True)  # a format without embedded opt-outs we read
        return True

    # XMP packets and C2PA stores, by scanning (GIF, TIFF, HEIF, JPEG XL, PDF) ----------------

    def _step_packet_search(self) -> bool:
        buf = self._buf
        keep_from = len(buf)
        if self._svg and self._svg_namespaces is None:
            keep_from = self._read_svg_root()
        starts = _SVG_PACKET_STARTS if self._svg else _PACKET_STARTS
        found = [i for i in (buf.find(start) for start in starts) if i >= 0]
        store = self._store_start()
        if store >= 0 and (not found or store < min(found)):
            del buf[:store]
            self._state = "c2pa_store"
            return True
        if not found:
            # A marker may straddle two chunks; an SVG root tag still arriving is kept whole.
            del buf[: max(0, min(len(buf) - _OVERLAP, keep_from))]
            return False
        del buf[: min(found)]
        self._searched = 0
        self._state = "packet"
        return True

    def _read_svg_root(self) -> int:
        """Read the namespace declarations of the root `<svg>` start tag (any prefix) once it
        is all here. Returns where the buffer must be kept from until then (the tag's start),
        else its length. Packets are looked for meanwhile: an SVG whose root is not found has
        its wrapped packets read as they are, and a bare rdf:RDF with no declarations."""
        buf = self._buf
        root = _SVG_ROOT.search(buf)
        if root is None:
            return len(buf)
        end = buf.find(b">", root.start())
        if end >= 0:
            self._svg_namespaces = b"".join(_XMLNS.findall(bytes(buf[root.start() : end])))
            return len(buf)
        if len(buf) - root.start() >= _SVG_ROOT_LIMIT:
            self._svg_namespaces = b""  # a start tag that long: read packets as they are
            return len(buf)
        return root.start()

    def _store_start(self) -> int:
        """Where the C2PA store (a JUMBF superbox) in the buffer begins: at its size, or at the
        length byte of a GIF's first data sub-block. -1: none (or one already seen)."""
        if self._store_seen:
            return -1
        buf = self._buf
        at = buf.find(_C2PA_STORE_MARK)
        if at < 0:
            return -1
        start = at - 12 - (self.meta.format is ImageFormat.GIF)
        if start < 0 or buf[at - 8 : at - 4] != b"jumb":
            self._store_seen = self.meta.c2pa_unread = True  # not laid out as expected
            return -1
        return start

    def _step_c2pa_store(self) -> bool:
        """The store, whole: in a GIF spread over data sub-blocks (C2PA 2.1, A.3.4), elsewhere
        (a BMFF `uuid` box, a TIFF tag, a PDF stream) in one piece."""
        buf = self._buf
        store: bytes | None
        if self.meta.format is ImageFormat.GIF:
            at, parts = 0, self._store_parts
            while at < len(buf) and buf[at] and self._store_size <= MAX_C2PA:
                size = buf[at]
                if at + 1 + size > len(buf):
                    break  # the rest of this sub-block is still to come
                parts.append(bytes(buf[at + 1 : at + 1 + size]))
                self._store_size += size
                at += 1 + size
            ended = at < len(buf) and not buf[at]
            del buf[: at + ended]  # once per call: sub-blocks are small, chunks are not
            if self._store_size > MAX_C2PA:
                store = None
            elif ended:
                store = b"".join(parts)
            else:
                return False
            parts.clear()
        else:
            if len(buf) < 4:
                return False
            (size,) = struct.unpack(">I", buf[:4])
            if size < 8:  # no box (or a 64-bit size, which no store needs): not read
                self._store_seen = self.meta.c2pa_unread = True
                del buf[:1]
                self._state = "packet_search"
                return True
            if size > MAX_C2PA:
                store = None
            else:
                store = self._take(size)
                if store is None:
                    return False
        self._store_seen = True
        if store is None:
            self.meta.truncated = True
            del buf[:1]  # (GIF: past what was read of it) looking on for XMP
        else:
            self.meta.c2pa_store = store
        self._state = "packet_search"
        return True

    def _step_packet(self) -> bool:
        buf = self._buf
        bare = buf.startswith(_BARE_RDF)
        ends = []
        for end in (_BARE_RDF_END,) if bare else _PACKET_ENDS:
            at = buf.find(end, self._searched)
            if at >= 0:
                # The wrapper's end is a processing instruction: up to its "?>".
                close = at + len(end) if end.startswith(b"</") else buf.find(b"?>", at) + 2
                if close >= 2:
                    ends.append(close)
        if not ends and len(buf) <= MAX_XMP:
            # Its end is still to come; one may have begun at the buffer's end (the wrapper's
            # end runs to "?>", `<?xpacket end="w"?>` being the usual one: 64 bytes of slack).
            self._searched = max(0, len(buf) - 64)
            return False
        if min(ends, default=len(buf)) > MAX_XMP:
            self.meta.truncated = True  # too long to be read: skipped
            self._state = "packet_search"  # a C2PA store, or another packet, may follow
            del buf[:1]
            return True
        packet = self._take(min(ends))
        assert packet is not None
        if bare:  # given the namespaces it was declared in
            packet = b"<svg-metadata%s>%s</svg-metadata>" % (self._svg_namespaces or b"", packet)
        self._add_xmp(packet)
        self._state = "packet_search"
        return True

    # JPEG ------------------------------------------------------------------------------------

    def _step_jpeg_marker(self) -> bool:
        while self._buf[:1] == b"\xff" and self._buf[1:2] == b"\xff":
            del self._buf[:1]  # fill bytes (ITU T.81 B.1.1.2)
        if len(self._buf) < 2:
            return False
        if self._buf[0] != 0xFF:
            raise _Corrupt("JPEG: expected a marker")
        marker = self._buf[1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            del self._buf[:2]
            return True
        if marker in (0xDA, 0xD9):  # start of scan or end of image: no metadata after this
            self._finish(complete=True)
            return True
        if len(self._buf) < 4:
            return False
        (length,) = struct.unpack(">H", self._buf[2:4])
        if length < 2:
            raise _Corrupt("JPEG: bad segment length")
        if marker in (0xE1, 0xEB):
            payload = self._take(2 + length)
            if payload is None:
                return False
            self._jpeg_segment(marker, payload[4:])
        else:
            self._drop(2 + length)
        return True

    def _jpeg_segment(self, marker: int, payload: bytes) -> None:
        if marker == 0xE1 and payload.startswith(_XMP_JPEG):
            self._add_xmp(payload[len(_XMP_JPEG) :])
        elif marker == 0xE1 and payload.startswith(_XMP_JPEG_EXT):
            body = payload[len(_XMP_JPEG_EXT) :]
            if len(body) < 40:
                return
            guid, offset = body[:32], struct.unpack(">I", body[36:40])[0]
            if self._reserve_xmp(len(body) - 40):
                self._extended.setdefault(guid, {})[offset] = body[40:]
        elif marker == 0xEB and payload[:2] == b"JP" and len(payload) >= 16:
            # ISO 19566-5 B.3: CI "JP", En (box instance), Z (sequence); every segment repeats
            # the box header (LBox, TBox), which the first one keeps and the others drop.
            instance, sequence = struct.unpack(">HI", payload[2:8])
            box = payload[8:]
            header = 16 if box[:4] == b"\x00\x00\x00\x01" else 8
            data = box if sequence == 1 else box[header:]
            self._add_c2pa_part(instance, sequence, data)

    # PNG -------------------------------------------------------------------------------------

    def _step_png_chunk(self) -> bool:
        if len(self._buf) < 8:
            return False
        length, kind = struct.unpack(">I4s", self._buf[:8])
        if kind == b"IEND":
            self._finish(complete=True)
            return True
        if kind in (b"iTXt", b"tEXt", b"zTXt", b"caBX"):
            cap = MAX_C2PA if kind == b"caBX" else MAX_XMP
            if length > cap:
                self.meta.truncated = True
                self._drop(12 + length)
                return True
            chunk = self._take(12 + length)
            if chunk is None:
                return False
            data = chunk[8 : 8 + length]
            if kind == b"caBX":
                self._add_c2pa_part(0, 1, data)
            else:
                self._png_text(kind, data)
        else:
            self._drop(12 + length)
        return True

    def _png_text(self, kind: bytes, data: bytes) -> None:
        keyword, _, rest = data.partition(b"\x00")
        if keyword != _XMP_PNG_KEYWORD:
            return
        try:
            if kind == b"iTXt":
                compressed, method = rest[0], rest[1]
                _lang, _, rest = rest[2:].partition(b"\x00")
                _translated, _, text = rest.partition(b"\x00")
                if compressed and method == 0:
                    text = _inflate(text, MAX_XMP)
            elif kind == b"zTXt":
                text = _inflate(rest[1:], MAX_XMP)
            else:
                text = rest
        except (IndexError, zlib.error, _Corrupt):
            self.meta.truncated = True
            return
        self._add_xmp(text)

    # WebP (RIFF) -------------------------------------------------------------------------

    def _step_chunk(self) -> bool:
        if self._consumed >= self._riff_end:
            self._finish(complete=True)
            return True
        if len(self._buf) < 8:
            return False
        kind, size = struct.unpack("<4sI", self._buf[:8])
        padded = size + (size & 1)
        self._consumed += 8 + padded
        wanted = {b"XMP ": MAX_XMP, b"C2PA": MAX_C2PA}.get(kind)
        if wanted is None:
            self._drop(8 + padded)
            return True
        if size > wanted:
            self.meta.truncated = True
            self._drop(8 + padded)
            return True
        chunk = self._take(8 + padded)
        if chunk is None:
            self._consumed -= 8 + padded
            return False
        data = chunk[8 : 8 + size]
        if kind == b"XMP ":
            self._add_xmp(data)
        else:
            self._add_c2pa_part(0, 1, data)
        return True

    # payloads ----------------------------------------------------------------------------

    def _reserve_xmp(self, n: int) -> bool:
        if self._xmp_bytes + n > MAX_XMP:
            self.meta.truncated = True
            return False
        self._xmp_bytes += n
        return True

    def _add_xmp(self, packet: bytes) -> None:
        if self._reserve_xmp(len(packet)):
            self.meta.xmp.append(packet)

    def _add_c2pa_part(self, instance: int, sequence: int, data: bytes) -> None:
        parts = self._jumbf.setdefault(instance, {})
        if sum(map(len, parts.values())) + len(data) > MAX_C2PA:
            self.meta.truncated = True
            return
        parts[sequence] = data


class _Corrupt(ScanError):
    pass


def _inflate(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, limit + 1)
    if len(out) > limit:
        raise _Corrupt("compressed XMP too large")
    return out


def scan_image(body: bytes, *, max_scan: int = MAX_SCAN) -> ImageMetadata:
    """The metadata of a complete (or truncated) body in one call."""
    scanner = ImageMetadataScanner(max_scan=max_scan)
    scanner.feed(body)
    return scanner.finish()


# -- XMP: IPTC PLUS DataMining ---------------------------------------------------------------


def normalize_data_mining(value: str) -> str:
    value = value.strip()
    if value.lower().startswith(PLUS_VOCAB.lower()):
        value = value[len(PLUS_VOCAB) :]
    return value.upper()


@dataclass(frozen=True, slots=True)
class XmpFacts:
    data_mining: list[str]  # PLUS DataMining values, normalized (`DMI-PROHIBITED`, ...)
    provenance: str | None  # dcterms:provenance: where a remote C2PA manifest would be
    # TDMRep's XMP properties (tdm:reservation, tdm:policy), as PDFs carry them
    tdm: tdmrep.TdmDeclaration = tdmrep.UNSET


def read_xmp(packet: bytes) -> XmpFacts:
    """What one XMP packet says about data mining and C2PA provenance.

    XMP is attacker-supplied XML: expat with no DTDs, so no entity expansion. A packet that is
    not well-formed is searched textually instead, so that a sloppy writer's opt-out counts.
    """
    start = packet.find(b"<")
    if start < 0:
        return XmpFacts([], None)
    if b"\0" in packet:
        start -= start % 2  # UTF-16: cut at a character ("\0<" in big-endian order)
    elif not _names_read(packet):
        # Most photos' XMP (keywords, rights, camera: often many KiB) names neither: parsing
        # it would cost ~0.1 ms per KiB for nothing. UTF-16 packets (NULs) are parsed anyway.
        return XmpFacts([], None)
    reader = _XmpReader()
    try:
        reader.parse(packet[start:])
    except (expat.ExpatError, ValueError):  # not well-formed, or a DTD
        return XmpFacts(_data_mining_fallback(packet), None, _tdm_fallback(packet))
    declaration = tdmrep.TdmDeclaration(
        max(reader.reservations) if reader.reservations else None, reader.tdm_policy
    )
    return XmpFacts(reader.values, reader.provenance, declaration)


def _names_read(packet: bytes) -> bool:
    """Whether the packet (in an 8-bit encoding) names what `_XmpReader` or the fallback reads.
    Lower-cased, then searched: a case-insensitive regex takes ~30 us per KiB."""
    lower = packet.lower()
    return b"datamining" in lower or b"provenance" in lower or b"/ns/tdmrep/" in lower


def data_mining_values(packet: bytes) -> list[str]:
    return read_xmp(packet).data_mining


class _XmpReader:
    _ATTR = f"{PLUS_NS} DataMining"
    _RESOURCE = f"{RDF_NS} resource"
    _PROVENANCE = "http://purl.org/dc/terms/ provenance"
    _RESERVATION = f"{TDM_NS} reservation"
    _POLICY = f"{TDM_NS} policy"
    _PROPERTIES = (_ATTR, _RESERVATION, _POLICY)  # read as attributes or as elements
    _ITEM = f"{RDF_NS} li"

    def __init__(self) -> None:
        self.values: list[str] = []
        self.provenance: str | None = None
        self.reservations: list[int] = []
        self.tdm_policy: str | None = None
        self._depth = 0
        self._property = ""  # the element whose text is being read
        self._text: list[str] = []
        # The property as an RDF container (rdf:Bag, Seq, Alt): each rdf:li one value, its text
        # or its rdf:resource (not all their texts run together into one).
        self._item_at = 0  # the depth of the rdf:li being read, 0: none
        self._item_text: list[str] = []
        self._itemized = False

    def parse(self, data: bytes) -> None:
        parser = untrusted_xml.parser()
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._chars
        parser.Parse(data, True)

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        if self._PROVENANCE in attrs:
            self.provenance = attrs[self._PROVENANCE][:2048]
        for prop in self._PROPERTIES:
            if prop in attrs:
                self._value(prop, attrs[prop])
        if self._depth:
            self._depth += 1
            if name == self._ITEM and not self._item_at:
                self._itemized = True
                if self._RESOURCE in attrs:
                    self._value(self._property, attrs[self._RESOURCE])
                else:
                    self._item_at, self._item_text = self._depth, []
        elif name in self._PROPERTIES:
            self._depth = 1
            self._property = name
            self._text = []
            self._itemized = False
            if self._RESOURCE in attrs:
                self._value(name, attrs[self._RESOURCE])

    def _end(self, name: str) -> None:
        if not self._depth:
            return
        if self._depth == self._item_at:
            text = "".join(self._item_text).strip()
            if text:
                self._value(self._property, text)
            self._item_at = 0
        self._depth -= 1
        if self._depth == 0 and not self._itemized:
            text = "".join(self._text).strip()
            if text:
                self._value(self._property, text)

    def _value(self, prop: str, value: str) -> None:
        if prop == self._ATTR:
            self.values.append(normalize_data_mining(value))
        elif prop == self._RESERVATION:
            if (reservation := tdmrep.parse_reservation(value)) is not None:
                self.reservations.append(reservation)
        elif self.tdm_policy is None:
            self.tdm_policy = tdmrep.parse_policy(value)

    def _chars(self, data: str) -> None:
        if self._depth:
            self._text.append(data)
            if self._item_at:
                self._item_text.append(data)


_FALLBACK = re.compile(
    rb"DataMining[^<>]{0,200}?(?:=\s*[\"']|>)\s*(?:http://ns\.useplus\.org/ldf/vocab/)?"
    rb"(DMI-[A-Za-z-]{1,60})",
    re.IGNORECASE,
)


def _data_mining_fallback(packet: bytes) -> list[str]:
    if PLUS_NS.encode() not in packet:
        return []
    return [m.group(1).decode().upper() for m in _FALLBACK.finditer(packet)]


_TDM_FALLBACK = re.compile(rb"tdm:reservation\s*(?:=\s*[\"']|>)\s*([01])\b")


def _tdm_fallback(packet: bytes) -> tdmrep.TdmDeclaration:
    """A reservation in a packet that is not well-formed XML, found as text."""
    if TDM_NS.encode() not in packet:
        return tdmrep.UNSET
    found = [int(m.group(1)) for m in _TDM_FALLBACK.finditer(packet)]
    return tdmrep.TdmDeclaration(max(found) if found else None)


def prohibits_training(value: str) -> bool:
    return value.startswith("DMI-PROHIBITED")


# -- C2PA / CAWG training-mining -------------------------------------------------------------

_TRAINING_LABELS = ("c2pa.training-mining", "cawg.training-mining")
# Entries that concern training: AI training, generative AI training, and data mining (which
# includes training). `ai_inference` is about use as model input, not training.
_TRAINING_ENTRIES = ("ai_training", "ai_generative_training", "data_mining")
_USE_RANK = {"allowed": 0, "constrained": 1, "notAllowed": 2}


@dataclass(frozen=True, slots=True)
class TrainingMining:
    """One training-mining assertion: its namespace ("c2pa" or "cawg") and its strictest
    `use` among the entries about training."""

    namespace: str
    use: str

    @property
    def opts_out(self) -> bool:
        return self.use in ("notAllowed", "constrained")


@functools.cache
def c2pa_context() -> Any:
    """The c2pa-python context the gateway reads with: no network (remote manifests, OCSP)."""
    import c2pa

    settings = c2pa.Settings.from_dict(
        {
            "verify": {
                "remote_manifest_fetch": False,
                "ocsp_fetch": False,
                "verify_trust": False,
            },
        }
    )
    return c2pa.Context(settings)


def read_training_mining(store: bytes) -> list[TrainingMining]:
    """The training-mining assertions of every manifest in a C2PA manifest store (ingredients'
    manifests included: their content is in the asset too). Raises ValueError if the store
    cannot be read."""
    import c2pa

    try:
        reader = c2pa.Reader("application/c2pa", io.BytesIO(store), context=c2pa_context())
        try:
            data = json.loads(reader.json())
        finally:
            reader.close()
    except (c2pa.C2paError, ValueError) as e:
        raise ValueError(f"unreadable C2PA manifest store: {e}") from e
    found: list[TrainingMining] = []
    for manifest in (data.get("manifests") or {}).values():
        for assertion in manifest.get("assertions") or []:
            label = re.sub(r"(__\d+|\.v\d+)+$", "", str(assertion.get("label", "")))
            if label not in _TRAINING_LABELS:
                continue
            entries = (assertion.get("data") or {}).get("entries") or {}
            uses = [
                str(entry.get("use"))
                for key, entry in entries.items()
                if isinstance(entry, dict) and key.rsplit(".", 1)[-1] in _TRAINING_ENTRIES
            ]
            ranked = [u for u in uses if u in _USE_RANK]
            if ranked:
                found.append(
                    TrainingMining(label.split(".")[0], max(ranked, key=lambda u: _USE_RANK[u]))
                )
    return found


# -- signals ---------------------------------------------------------------------------------


def image_signals(meta: ImageMetadata) -> list[OptOutSignal]:
    """The opt-out signals of one image's metadata. Reads a C2PA store if there is one (a few
    milliseconds of native code: call from a worker thread in the event loop)."""
    signals: list[OptOutSignal] = []
    remote: str | None = None
    reservations: list[int] = []
    tdm_policy: str | None = None
    for packet in meta.xmp:
        facts = read_xmp(packet)
        remote = remote or facts.provenance
        if facts.tdm.reservation is not None:
            reservations.append(facts.tdm.reservation)
        tdm_policy = tdm_policy or facts.tdm.policy
        for value in facts.data_mining:
            known = value in DATA_MINING_VALUES
            name = f"iptc-plus:{value}" if known else "iptc-plus:other"
            opts_out = prohibits_training(value)
            detail = f"the image's IPTC PLUS DataMining says {value}"
            signals.append(OptOutSignal(Kind.IMAGE_METADATA, name, opts_out, detail))
    if reservations or tdm_policy:
        declaration = tdmrep.TdmDeclaration(max(reservations, default=None), tdm_policy)
        signals += optout.tdm_signals(declaration, "tdm-xmp")
    if meta.c2pa_store is not None:
        try:
            assertions = read_training_mining(meta.c2pa_store)
        except ValueError as e:
            signals.append(OptOutSignal(Kind.IMAGE_METADATA, "c2pa:unreadable", False, str(e)))
        else:
            for a in assertions:
                signals.append(
                    OptOutSignal(
                        Kind.IMAGE_METADATA,
                        f"{a.namespace}:training-mining={a.use}",
                        a.opts_out,
                        f"the image's {a.namespace}.training-mining assertion says {a.use}",
                    )
                )
    if meta.c2pa_unread:
        signals.append(
            OptOutSignal(
                Kind.IMAGE_METADATA,
                "c2pa:unread",
                False,
                f"the {meta.format} file carries a C2PA manifest store that is not laid out "
                "as the gateway reads one (a JUMBF superbox around its description box)",
            )
        )
    if remote is not None and meta.c2pa_store is None:
        # The manifest lives elsewhere; the gateway never fetches it (no request to a URL an
        # image names), but the record says that one exists.
        signals.append(
            OptOutSignal(
                Kind.IMAGE_METADATA,
                "c2pa:remote-manifest",
                False,
                f"the image refers to a remote C2PA manifest at {remote}, which is not fetched",
            )
        )
    if meta.truncated or not meta.complete:
        signals.append(
            OptOutSignal(
                Kind.IMAGE_METADATA,
                "image-metadata:incomplete",
                False,
                meta.error or "some metadata exceeded the scan limits",
            )
        )
    return list({s.name: s for s in signals}.values())
