"""Fixtures for the opt-out tests, all made here: images, XMP packets, a C2PA certificate chain,
C2PA-signed images, and origin servers on 127.0.0.1 reached by RFC 2606 names."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import ipaddress
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import zipfile
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.oid import NameOID

from proxy.governor import RequestContext
from proxy.identity import Identity
from proxy.inputs import other_readings
from proxy.optout_checks import OptOutChecks
from proxy.policy import Policy
from proxy.policy import parse_policy
from proxy.sites import SiteDirectory
from proxy.sites import normalize_host
from proxy.ssrf import AddressGuard
from proxy.ssrf import Resolver

PLUS_NS = "http://ns.useplus.org/ldf/xmp/1.0/"
PLUS_VOCAB = "http://ns.useplus.org/ldf/vocab/"

# -- images ---------------------------------------------------------------------------------


def _segment(marker: int, data: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(data) + 2) + data


def jpeg(*app_segments: tuple[int, bytes]) -> bytes:
    """A valid 8x8 grey baseline JPEG (one DC-only block), with extra APPn segments after JFIF.

    Both Huffman tables hold a single 1-bit code, so the entropy-coded data is one byte:
    DC category 0 ("0"), end of block ("0"), padded with 1s.
    """
    jfif = _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    extra = b"".join(_segment(marker, data) for marker, data in app_segments)
    dqt = _segment(0xDB, b"\x00" + bytes([1] * 64))
    sof = _segment(0xC0, b"\x08" + struct.pack(">HH", 8, 8) + b"\x01\x01\x11\x00")
    dht_dc = _segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")
    dht_ac = _segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\x00")
    sos = _segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    return b"\xff\xd8" + jfif + extra + dqt + sof + dht_dc + dht_ac + sos + b"\x3f\xff\xd9"


def jpeg_with_xmp(packet: bytes) -> bytes:
    return jpeg((0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + packet))


def jpeg_with_extended_xmp(main: bytes, extended: bytes, parts: int = 3) -> bytes:
    """XMP split as Adobe's XMP spec part 3 1.1.3.1 says: a main packet plus extension parts."""
    guid = b"0123456789ABCDEF0123456789ABCDEF"
    size = -(-len(extended) // parts)
    segments = [(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + main)]
    for offset in range(0, len(extended), size):
        header = (
            b"http://ns.adobe.com/xmp/extension/\x00"
            + guid
            + struct.pack(">II", len(extended), offset)
        )
        segments.append((0xE1, header + extended[offset : offset + size]))
    return jpeg(*segments)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(*, before_idat: list[bytes] = (), after_idat: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    """A valid 1x1 grey PNG with extra chunks (already framed) before and after IDAT."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"\x00\x80"))
    return (
        b"\x89PNG\r\n\x1a\n"
        + ihdr
        + b"".join(before_idat)
        + idat
        + b"".join(after_idat)
        + png_chunk(b"IEND", b"")
    )


def png_xmp_chunk(packet: bytes, *, compressed: bool = False) -> bytes:
    text = zlib.compress(packet) if compressed else packet
    flag = b"\x01\x00" if compressed else b"\x00\x00"
    return png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00" + flag + b"\x00\x00" + text)


def _riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) % 2 else b"")


def _vp8l_1x1() -> bytes:
    """A lossless 1x1 image: header (signature 0x2f, width-1 and height-1 in 14 bits each,
    no alpha, version 0), no transforms, no colour cache, no meta codes, then five simple prefix
    codes of one symbol each, so the single pixel takes no bits."""
    bits = [0, 0, 0] + [1, 0, 0, 0] * 5
    value = sum(bit << i for i, bit in enumerate(bits))
    return b"\x2f" + struct.pack("<I", 0) + value.to_bytes(3, "little")


def webp(*, xmp: bytes | None = None, simple: bool = False) -> bytes:
    """A WebP 1x1: simple format (one VP8L chunk), or extended with an `XMP ` chunk after the
    image data as the container spec orders it."""
    image = _riff_chunk(b"VP8L", _vp8l_1x1())
    if simple:
        chunks = image
    else:
        flags = 0x04 if xmp is not None else 0
        vp8x = _riff_chunk(b"VP8X", bytes([flags, 0, 0, 0]) + b"\x00\x00\x00" + b"\x00\x00\x00")
        chunks = vp8x + image + (_riff_chunk(b"XMP ", xmp) if xmp is not None else b"")
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


def avif(xmp: bytes | None = None) -> bytes:
    """A real 16x16 AVIF from libavif (Pillow), its XMP in a metadata item as libavif writes it."""
    from PIL import Image
    from PIL import features

    assert features.check("avif"), "this Pillow has no AVIF encoder"
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(out, "AVIF", **({"xmp": xmp} if xmp else {}))
    return out.getvalue()


def tiff(xmp: bytes | None = None) -> bytes:
    """A real 16x16 TIFF (Pillow), its XMP in tag 700 (XMP Part 3, 1.1.6)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(out, "TIFF", tiffinfo={700: xmp} if xmp else {})
    return out.getvalue()


def gif(xmp: bytes | None = None) -> bytes:
    """A 1x1 GIF89a, its XMP in the `XMP DataXMP` application extension: the packet as it is,
    then the 258-byte "magic trailer" that makes it read as sub-blocks (XMP Part 3, 1.1.2)."""
    extension = b""
    if xmp is not None:
        trailer = b"\x01" + bytes(range(255, -1, -1)) + b"\x00"
        extension = b"\x21\xff\x0bXMP DataXMP" + xmp + trailer
    return (
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
        + extension
        + b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00\x3b"
    )


def jxl(xmp: bytes | None = None) -> bytes:
    """A JPEG XL container (ISO/IEC 18181-2): its signature box, `ftyp`, the XMP in an `xml `
    box as the container stores it uncompressed, then a codestream box (a placeholder here:
    the scan reads boxes, not the image)."""

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    return (
        b"\x00\x00\x00\x0cJXL \r\n\x87\n"
        + box(b"ftyp", b"jxl \x00\x00\x00\x00jxl ")
        + (box(b"xml ", xmp) if xmp is not None else b"")
        + box(b"jxlc", b"\xff\x0a" + bytes(32))
    )


def svg(xmp: bytes | None = None, *, shapes: int = 200) -> bytes:
    """An SVG image with its XMP packet in `<metadata>`, where XMP's SVG handler puts it (after
    the drawing's `<defs>`, before or among its shapes)."""
    metadata = b"<metadata>" + xmp + b"</metadata>" if xmp is not None else b""
    drawing = b'<circle cx="10" cy="10" r="5" fill="#c33"/>' * shapes
    return (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
        b"<title>test</title>" + drawing + metadata + drawing + b"</svg>"
    )


def inkscape_svg(value: str, *, namespaces_on_root: bool = True) -> bytes:
    """An SVG as Inkscape writes one: a bare rdf:RDF in <metadata> (neither x:xmpmeta nor
    xpacket), its namespaces declared on the root <svg> element (or on rdf:RDF)."""
    declarations = (
        b' xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"'
        b' xmlns:cc="http://creativecommons.org/ns#"'
        b" xmlns:plus='http://ns.useplus.org/ldf/xmp/1.0/'"
    )
    root, rdf = (declarations, b"") if namespaces_on_root else (b"", declarations)
    drawing = b'<circle cx="10" cy="10" r="5" fill="#c33"/>' * 200
    return (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg"'
        + root
        + b' width="100" height="100">'
        + drawing
        + b'<metadata id="metadata5"><rdf:RDF'
        + rdf
        + b'><cc:Work rdf:about=""><plus:DataMining rdf:resource="'
        + (PLUS_VOCAB + value).encode()
        + b'"/></cc:Work></rdf:RDF></metadata>'
        + drawing
        + b"</svg>"
    )


def pdf(xmp: bytes | None = None) -> bytes:
    """A one-page PDF 1.7 whose catalog has an uncompressed XMP metadata stream (ISO 32000-1
    14.3.2, where TDMRep puts a document's tdm:reservation), with a correct xref table."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R" + (b" /Metadata 4 0 R" if xmp else b"") + b" >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
    ]
    if xmp:
        objects.append(
            b"<< /Type /Metadata /Subtype /XML /Length %d >>\nstream\n%s\nendstream"
            % (len(xmp), xmp)
        )
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def tdm_xmp_packet(
    reservation: str, policy: str | None = None, *, form: str = "attribute"
) -> bytes:
    """An XMP packet with TDMRep's properties, as TDMRep says a PDF carries them."""
    ns = 'xmlns:tdm="http://www.w3.org/ns/tdmrep/"'
    if form == "attribute":
        props = f'tdm:reservation="{reservation}"' + (f' tdm:policy="{policy}"' if policy else "")
        description = f'<rdf:Description rdf:about="" {ns} {props}/>'
    else:
        inner = f"<tdm:reservation>{reservation}</tdm:reservation>"
        inner += f"<tdm:policy>{policy}</tdm:policy>" if policy else ""
        description = f'<rdf:Description rdf:about="" {ns}>{inner}</rdf:Description>'
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f"{description}</rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


CONTAINER_XML = b"""<?xml version="1.0" encoding="UTF-8"?>
<container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">
  <rootfiles>%s</rootfiles>
</container>"""


def opf(metadata: str = "", *, prefix: str | None = "tdm: http://www.w3.org/ns/tdmrep#") -> bytes:
    """An EPUB 3 package document with these `<metadata>` children, and the `prefix` attribute
    TDMRep says declares `tdm:` (None: no prefix attribute)."""
    declared = f' prefix="{prefix}"' if prefix is not None else ""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<package xmlns="http://www.idpf.org/2007/opf" version="3.0" unique-identifier="id"{declared}>
  <metadata xmlns:dc="http://purl.org/dc/elements/1.1/">
    <dc:identifier id="id">urn:isbn:9780000000001</dc:identifier>
    <dc:title>A Test Book</dc:title>
    <dc:language>en</dc:language>
    {metadata}
  </metadata>
  <manifest><item id="c1" href="c1.xhtml" media-type="application/xhtml+xml"/></manifest>
  <spine><itemref idref="c1"/></spine>
</package>""".encode()


def epub_reservation(reservation: str, policy: str | None = None) -> bytes:
    """An EPUB 3 package document saying TDMRep's reservation (and policy), as TDMRep says."""
    meta = f'<meta property="tdm:reservation">{reservation}</meta>'
    if policy:
        meta += f'<meta property="tdm:policy">{policy}</meta>'
    return opf(meta)


class _Unseekable(io.RawIOBase):
    """Where zipfile writes as it must to a pipe: each entry's sizes in a data descriptor
    after it (flag bit 3), as streaming EPUB writers do."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += b
        return len(b)


def epub(
    *packages: bytes,
    names: tuple[str, ...] = (),
    before: tuple[tuple[str, bytes], ...] = (),
    after: tuple[tuple[str, bytes], ...] = (),
    descriptors: bool = False,
    package_first: bool = False,
    stored: bool = False,
) -> bytes:
    """An EPUB (OCF ZIP): `mimetype` first and stored, `META-INF/container.xml` naming the
    package documents, `before` entries between them and the packages, `after` entries behind.
    `descriptors`: sizes after each entry's data, as a writer to a pipe puts them;
    `package_first`: the package documents before container.xml (legal, if unusual);
    `stored`: every entry stored, none deflated."""
    names = names or tuple(f"OEBPS/content{i or ''}.opf" for i in range(len(packages)))
    container = CONTAINER_XML % b"".join(
        b'<rootfile full-path="%s" media-type="application/oebps-package+xml"/>' % n.encode()
        for n in names
    )
    sink: Any = _Unseekable() if descriptors else io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(sink, "w", method) as book:
        book.writestr(zipfile.ZipInfo("mimetype"), b"application/epub+zip", zipfile.ZIP_STORED)
        entries = [("META-INF/container.xml", container), *before]
        packaged = list(zip(names, packages, strict=True))
        entries = packaged + entries if package_first else entries + packaged
        for name, data in [*entries, *after]:
            book.writestr(name, data)
    return bytes(sink.data if descriptors else sink.getvalue())


def xmp_packet(value: str | None, *, form: str = "attribute", prefix: str = "plus") -> bytes:
    """An XMP packet with PLUS DataMining in attribute, element or rdf:resource form, under
    any namespace prefix. `value` is a vocabulary code (DMI-...) or a full URI."""
    uri = value if value is None or value.startswith("http") else PLUS_VOCAB + value
    attribute = element = ""
    if value is not None and form == "attribute":
        attribute = f' {prefix}:DataMining="{uri}"'
    elif value is not None and form == "element":
        element = f"<{prefix}:DataMining>{uri}</{prefix}:DataMining>"
    elif value is not None and form == "resource":
        element = f'<{prefix}:DataMining rdf:resource="{uri}"/>'
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:{prefix}="{PLUS_NS}"'
        ' xmlns:dc="http://purl.org/dc/elements/1.1/"'
        f"{attribute}>"
        "<dc:format>image/jpeg</dc:format>"
        f"{element}"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


# -- C2PA ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningChain:
    key: ec.EllipticCurvePrivateKey
    chain_pem: str  # the signer's certificate, then the root's
    root_pem: str

    def sign(self, data: bytes) -> bytes:
        """ES256 as COSE wants it: r || s, 32 bytes each."""
        der = self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "crawlwarden tests"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
        ]
    )


def _usage(*, sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not sign,
        crl_sign=not sign,
        encipher_only=False,
        decipher_only=False,
    )


@cache
def signing_chain() -> SigningChain:
    """A root CA and an ES256 end-entity certificate with the profile C2PA requires (C2PA 2.x
    14.5.1: v3, digitalSignature, an allowed EKU such as emailProtection, not a CA)."""
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (
        x509.CertificateBuilder()
        .subject_name(_name("crawlwarden test root"))
        .issuer_name(_name("crawlwarden test root"))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("crawlwarden test signer"))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    root_pem = root.public_bytes(pem).decode()
    return SigningChain(key, leaf.public_bytes(pem).decode() + root_pem, root_pem)


def training_mining(namespace: str, use: str, entry: str = "ai_training") -> dict[str, Any]:
    """A `c2pa.training-mining` or `cawg.training-mining` assertion with one entry."""
    data: dict[str, Any] = {"use": use}
    if use == "constrained":
        data["constraint_info"] = "licence required: https://example.org/licensing"
    return {
        "label": f"{namespace}.training-mining",
        "data": {"entries": {f"{namespace}.{entry}": data}},
    }


def c2pa_sign(
    image: bytes,
    mime: str,
    assertions: list[dict[str, Any]],
    *,
    remote_url: str | None = None,
) -> bytes:
    """Sign `image` with a manifest holding `assertions` (plus the required created action)."""
    import c2pa

    chain = signing_chain()
    manifest = {
        "claim_generator_info": [{"name": "crawlwarden-tests", "version": "1.0"}],
        "title": "fixture",
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": "http://cv.iptc.org/newscodes/"
                            "digitalsourcetype/digitalCapture",
                        }
                    ]
                },
            },
            *assertions,
        ],
    }
    settings = c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}})
    context = c2pa.Context(settings)
    signer = c2pa.Signer.from_callback(chain.sign, c2pa.C2paSigningAlg.ES256, chain.chain_pem)
    builder = c2pa.Builder(manifest, context=context)
    if remote_url is not None:
        builder.set_no_embed()
        builder.set_remote_url(remote_url)
    out = io.BytesIO()
    builder.sign(signer, mime, io.BytesIO(image), out)
    return out.getvalue()


# -- network: names, guard, origin servers ---------------------------------------------------


def static_resolver() -> Resolver:
    """RFC 2606 names under .test answered by static_hosts, never by DNS."""

    async def no_dns(host: str) -> list[Any]:
        raise AssertionError(f"a test looked up {host} in DNS")

    return Resolver({"*.test": ipaddress.ip_address("127.0.0.1")}, lookup=no_dns)


def private_guard() -> AddressGuard:
    return AddressGuard([ipaddress.ip_network("127.0.0.0/8")])


type Handler = Callable[[web.Request], Any]


@dataclass
class Origin:
    """An aiohttp server on 127.0.0.1; `hits` counts requests per path."""

    port: int
    hits: Counter[str]
    requests: list[web.Request]

    def origin(self, host: str = "site-a.test", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}"


@asynccontextmanager
async def origin_server(
    routes: dict[str, Handler | web.Response | str], ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Origin]:
    """Serve `routes` (path -> handler, prepared response or text body) on a free port, over
    TLS if `ssl_context` is given."""
    hits: Counter[str] = Counter()
    seen: list[web.Request] = []

    async def dispatch(request: web.Request) -> web.StreamResponse:
        hits[request.path] += 1
        seen.append(request)
        route = routes.get(request.path)
        if route is None:
            return web.Response(status=404, text="not found")
        if isinstance(route, str):
            return web.Response(text=route)
        if isinstance(route, web.Response):
            return web.Response(status=route.status, body=route.body, headers=dict(route.headers))
        result = route(request)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    site = web.SockSite(runner, sock, ssl_context=ssl_context)
    await site.start()
    try:
        yield Origin(port, hits, seen)
    finally:
        await runner.cleanup()


@dataclass
class RedisServer:
    socket_path: str
    process: subprocess.Popen[bytes]


def start_redis(directory: Path) -> RedisServer | None:
    """A real redis-server on a unix socket in `directory`; None if it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    path = str(directory / "redis.sock")
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", path, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=directory,
    )
    return RedisServer(path, process)


def short_tmp() -> Path:
    """Unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer."""
    return Path(tempfile.mkdtemp(prefix="cw-", dir="/tmp" if os.path.isdir("/tmp") else None))


# -- policies and request contexts -----------------------------------------------------------

TOKEN = "ExampleBot"
USER_AGENT = "ExampleBot/1.0 (+https://crawler.example/examplebot)"
CONTACT = "crawl-ops@crawler.example"


def make_policy(sites: list[dict[str, Any]] | None = None, **defaults: Any) -> Policy:
    """A policy that respects every signal by default; `sites` and `defaults` override."""
    data = {
        "version": 1,
        "crawler": {"user_agent": USER_AGENT, "robots_tokens": [TOKEN], "contact": CONTACT},
        "egress": {"provider": "test-transit"},
        "teams": [{"name": "vision-data", "token_sha256": "0" * 64}],
        "defaults": defaults,
        "sites": sites or [],
        "network": {"allow_private": ["127.0.0.0/8"], "static_hosts": {"*.test": "127.0.0.1"}},
    }
    return parse_policy(yaml.safe_dump(data)).policy


def request_context(
    policy: Policy, url: str, *, day: dt.date | None = None, method: str = "GET"
) -> RequestContext:
    """The governor's context of a request for `url` on `day` (today by default)."""
    parts = urlsplit(url)
    scheme = parts.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    host = normalize_host(parts.hostname or "")
    site = SiteDirectory(policy).site_for(host)
    basis, respect = site.terms_on(day or dt.datetime.now(dt.UTC).date())
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return RequestContext(
        identity=Identity("vision-data", frozenset(), None),
        method=method,
        scheme=scheme,
        host=host,
        port=port,
        url=url,
        path=path,
        site=site,
        basis=basis,
        respect=respect,
        readings=other_readings(path),  # as the governor does
    )


def make_checks(policy: Policy | None = None, **kwargs: Any) -> OptOutChecks:
    policy = policy or make_policy()
    return OptOutChecks(policy.crawler, static_resolver(), private_guard(), **kwargs)


def off_the_main_thread(
    monkeypatch: pytest.MonkeyPatch, module: Any, **functions: str
) -> dict[str, list[bool]]:
    """Each of `module`'s `functions` (label=attribute name) wrapped to note, at each call,
    whether it ran on a worker thread (True) or on the event loop's (False)."""
    calls: dict[str, list[bool]] = {label: [] for label in functions}
    for label, name in functions.items():
        work = getattr(module, name)

        def run(*args: Any, _label: str = label, _work: Any = work) -> Any:
            calls[_label].append(threading.current_thread() is not threading.main_thread())
            return _work(*args)

        monkeypatch.setattr(module, name, run)
    return calls
