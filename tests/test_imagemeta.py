"""Image metadata: IPTC PLUS DataMining in JPEG, PNG and WebP XMP, and C2PA/CAWG training-mining
in images signed here with c2pa-python and a certificate chain made here."""

from __future__ import annotations

import io
import os
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

import pytest

from proxy import imagemeta
from proxy.imagemeta import RDF_NS
from proxy.imagemeta import ImageFormat
from tests.optout_fixtures import PLUS_VOCAB
from tests.optout_fixtures import avif
from tests.optout_fixtures import c2pa_sign
from tests.optout_fixtures import gif
from tests.optout_fixtures import inkscape_svg
from tests.optout_fixtures import jpeg
from tests.optout_fixtures import jpeg_with_extended_xmp
from tests.optout_fixtures import jpeg_with_xmp
from tests.optout_fixtures import jxl
from tests.optout_fixtures import pdf
from tests.optout_fixtures import png
from tests.optout_fixtures import png_chunk
from tests.optout_fixtures import png_xmp_chunk
from tests.optout_fixtures import svg
from tests.optout_fixtures import tdm_xmp_packet
from tests.optout_fixtures import tiff
from tests.optout_fixtures import training_mining
from tests.optout_fixtures import webp
from tests.optout_fixtures import xmp_packet

PROHIBITING = [
    "DMI-PROHIBITED",
    "DMI-PROHIBITED-AIMLTRAINING",
    "DMI-PROHIBITED-GENAIMLTRAINING",
    "DMI-PROHIBITED-EXCEPTSEARCHENGINEINDEXING",
    "DMI-PROHIBITED-SEECONSTRAINT",
    "DMI-PROHIBITED-SEEEMBEDDEDRIGHTSEXPR",
    "DMI-PROHIBITED-SEELINKEDRIGHTSEXPR",
]
PERMITTING = ["DMI-UNSPECIFIED", "DMI-ALLOWED"]


def signals(body: bytes) -> dict[str, bool]:
    return {s.name: s.opts_out for s in imagemeta.image_signals(imagemeta.scan_image(body))}


# -- XMP: IPTC PLUS DataMining --------------------------------------------------------------


@pytest.mark.parametrize("value", PROHIBITING + PERMITTING)
@pytest.mark.parametrize("form", ["attribute", "element", "resource"])
def test_every_vocabulary_value_in_every_form(value: str, form: str) -> None:
    image = jpeg_with_xmp(xmp_packet(value, form=form))
    assert signals(image) == {f"iptc-plus:{value}": value in PROHIBITING}


@pytest.mark.parametrize("prefix", ["plus", "p", "ldf"])
def test_the_namespace_uri_matters_not_the_prefix(prefix: str) -> None:
    packet = xmp_packet("DMI-PROHIBITED-AIMLTRAINING", prefix=prefix)
    assert imagemeta.data_mining_values(packet) == ["DMI-PROHIBITED-AIMLTRAINING"]


def test_a_datamining_property_of_another_namespace_is_not_plus() -> None:
    packet = xmp_packet("DMI-PROHIBITED").replace(
        b"http://ns.useplus.org/ldf/xmp/1.0/", b"http://example.test/not-plus/"
    )
    assert imagemeta.data_mining_values(packet) == []


def test_bare_codes_and_case_are_normalized() -> None:
    packet = xmp_packet(f"{PLUS_VOCAB}dmi-prohibited-genaimltraining", form="element")
    assert imagemeta.data_mining_values(packet) == ["DMI-PROHIBITED-GENAIMLTRAINING"]
    unknown = xmp_packet("DMI-PROHIBITED-SOMETHING-NEW")
    assert signals(jpeg_with_xmp(unknown)) == {"iptc-plus:other": True}


def test_a_malformed_packet_is_still_read() -> None:
    packet = xmp_packet("DMI-PROHIBITED", form="element").replace(b"</rdf:RDF>", b"")
    assert imagemeta.data_mining_values(packet) == ["DMI-PROHIBITED"]


@pytest.mark.parametrize("lead", ["", "\n "])
@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-16"])
def test_a_packet_in_utf16_is_read(encoding: str, lead: str) -> None:
    packet = (lead + xmp_packet("DMI-PROHIBITED").decode()).encode(encoding)
    assert imagemeta.data_mining_values(packet) == ["DMI-PROHIBITED"]


def test_a_packet_that_names_neither_data_mining_nor_provenance_is_not_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Photos carry many KiB of XMP (keywords, rights, camera); parsing it cost ~0.1 ms per KiB.
    parsed: list[bytes] = []
    original = imagemeta._XmpReader.parse
    monkeypatch.setattr(
        imagemeta._XmpReader,
        "parse",
        lambda self, data: (parsed.append(data), original(self, data)),
    )
    keywords = b"<dc:subject><rdf:Bag>" + b"<rdf:li>a keyword</rdf:li>" * 300 + b"</rdf:Bag>"
    plain = xmp_packet(None).replace(
        b"</rdf:Description>", keywords + b"</dc:subject></rdf:Description>"
    )
    assert imagemeta.read_xmp(plain) == imagemeta.XmpFacts([], None) and parsed == []
    assert imagemeta.read_xmp(plain.decode().encode("utf-16")) == imagemeta.XmpFacts([], None)
    assert len(parsed) == 1  # UTF-16 is not searched as bytes: parsed
    remote = b' xmlns:dcterms="http://purl.org/dc/terms/" dcterms:provenance="https://cr.test/m"'
    with_provenance = plain.replace(b' rdf:about=""', b' rdf:about=""' + remote)
    assert imagemeta.read_xmp(with_provenance).provenance == "https://cr.test/m"
    lower = xmp_packet("DMI-PROHIBITED", form="element").replace(b"DataMining", b"datamining")
    assert imagemeta.read_xmp(lower).data_mining == []  # parsed: XML names are case-sensitive
    assert len(parsed) == 3


def test_entities_are_never_expanded() -> None:
    # A billion-laughs packet: each entity doubles the last, 2**40 "a"s if expanded.
    entities = "".join(f'<!ENTITY a{i} "&a{i - 1};&a{i - 1};">' for i in range(1, 41))
    bomb = f'<!DOCTYPE x [<!ENTITY a0 "a">{entities}]><x>&a40;</x>'.encode()
    assert imagemeta.data_mining_values(bomb) == []


# -- where the XMP is ------------------------------------------------------------------------


def test_jpeg_extended_xmp_is_reassembled() -> None:
    main = xmp_packet(None)
    extended = xmp_packet("DMI-PROHIBITED", form="element") + b" " * 150_000
    image = jpeg_with_extended_xmp(main, extended)
    meta = imagemeta.scan_image(image)
    assert meta.complete and len(meta.xmp) == 2
    assert signals(image) == {"iptc-plus:DMI-PROHIBITED": True}


@pytest.mark.parametrize("compressed", [False, True])
def test_png_itxt_before_the_image_data(compressed: bool) -> None:
    image = png(before_idat=[png_xmp_chunk(xmp_packet("DMI-PROHIBITED"), compressed=compressed)])
    assert signals(image) == {"iptc-plus:DMI-PROHIBITED": True}


@pytest.mark.parametrize("compressed", [False, True])
def test_png_xmp_after_the_image_data_is_read(compressed: bool) -> None:
    # PNG puts no order on text chunks; ImageMagick and ExifTool before 11.63 write XMP after
    # IDAT. The image data is walked over, not kept.
    xmp = png_xmp_chunk(xmp_packet("DMI-PROHIBITED"), compressed=compressed)
    image = png(after_idat=[png_chunk(b"IDAT", os.urandom(3 * 2**20)), xmp])
    scanner = imagemeta.ImageMetadataScanner()
    head = image[: image.index(xmp)]
    assert not any(scanner.feed(head[i : i + 65536]) for i in range(0, len(head), 65536))
    assert len(scanner._buf) <= 65536  # the image data passed over, not kept
    assert signals(image) == {"iptc-plus:DMI-PROHIBITED": True}


def test_a_png_cut_off_before_iend_is_incomplete() -> None:
    image = png(after_idat=[png_xmp_chunk(xmp_packet(None))])
    meta = imagemeta.scan_image(image[: image.index(b"IEND") - 4])
    assert not meta.complete and meta.format is ImageFormat.PNG


def test_webp_xmp_after_the_image_data() -> None:
    image = webp(xmp=xmp_packet("DMI-PROHIBITED-AIMLTRAINING", form="resource"))
    meta = imagemeta.scan_image(image)
    assert meta.format is ImageFormat.WEBP and meta.complete
    assert signals(image) == {"iptc-plus:DMI-PROHIBITED-AIMLTRAINING": True}


def test_a_simple_webp_signed_by_the_c2pa_sdk_is_read() -> None:
    # The SDK appends a C2PA chunk to a simple-format WebP (no VP8X): the scan used to stop at
    # the image chunk, the container spec saying such a file has no metadata.
    image = c2pa_sign(webp(simple=True), "image/webp", [training_mining("c2pa", "notAllowed")])
    assert b"VP8X" not in image and b"C2PA" in image
    assert signals(image) == {"c2pa:training-mining=notAllowed": True}
    plain = imagemeta.scan_image(webp(simple=True))
    assert plain.complete and plain.c2pa_store is None and not plain.xmp


def feed_in_pieces(body: bytes, size: int) -> imagemeta.ImageMetadata:
    scanner = imagemeta.ImageMetadataScanner()
    for i in range(0, len(body), size):
        if scanner.feed(body[i : i + size]):
            break
    return scanner.finish()


@pytest.mark.parametrize("size", [1, 3, 64, 4096])
@pytest.mark.parametrize("kind", ["jpeg", "png", "webp"])
def test_incremental_feeding_gives_the_same_answer(kind: str, size: int) -> None:
    packet = xmp_packet("DMI-PROHIBITED")
    body = {
        "jpeg": jpeg_with_xmp(packet),
        "png": png(before_idat=[png_xmp_chunk(packet, compressed=True)]),
        "webp": webp(xmp=packet),
    }[kind]
    meta = feed_in_pieces(body, size)
    assert meta.complete and [imagemeta.data_mining_values(p) for p in meta.xmp] == [
        ["DMI-PROHIBITED"]
    ]


def test_jpeg_decision_needs_only_the_bytes_before_the_scan() -> None:
    image = jpeg_with_xmp(xmp_packet("DMI-PROHIBITED"))
    sos = image.index(b"\xff\xda")
    scanner = imagemeta.ImageMetadataScanner()
    assert not scanner.feed(image[:sos])
    assert scanner.feed(image[sos : sos + 2])


def test_the_scan_gives_up_at_its_limit() -> None:
    filler = b"".join(b"\xff\xe2\xff\xff" + b"\x00" * 65533 for _ in range(40))  # APP2 padding
    image = jpeg()[:2] + filler + jpeg_with_xmp(xmp_packet("DMI-PROHIBITED"))[2:]
    scanner = imagemeta.ImageMetadataScanner(max_scan=1_000_000)
    for i in range(0, len(image), 65536):
        if scanner.feed(image[i : i + 65536]):
            break
    meta = scanner.finish()
    assert not meta.complete and scanner.seen <= 1_000_000 + 65536
    names = {s.name for s in imagemeta.image_signals(meta)}
    assert names == {"image-metadata:incomplete"}


def test_an_oversized_xmp_chunk_is_skipped_not_buffered() -> None:
    huge = b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + b" " * (imagemeta.MAX_XMP + 1)
    chunk = (
        len(huge).to_bytes(4, "big")
        + b"iTXt"
        + huge
        + zlib.crc32(b"iTXt" + huge).to_bytes(4, "big")
    )
    meta = imagemeta.scan_image(png(before_idat=[chunk]))
    assert meta.truncated and meta.xmp == []


@pytest.mark.parametrize(
    ("body", "fmt", "complete"),
    [
        (b"GIF89a\x01\x00\x01\x00", ImageFormat.GIF, True),  # scanned to its end
        (b"\x00\x00\x00\x1cftypmp42", ImageFormat.OTHER, True),  # a video, not an image
        (b"\x00\x00\x00\x1cfty", None, False),
        (b"<html><head>", ImageFormat.OTHER, True),
        (b"\xff", None, False),  # too short to know
        (b"RIFF\x00\x00", None, False),
    ],
)
def test_other_and_short_bodies(body: bytes, fmt: ImageFormat | None, complete: bool) -> None:
    meta = imagemeta.scan_image(body)
    assert (meta.format, meta.complete) == (fmt, complete)


# -- C2PA / CAWG training-mining -------------------------------------------------------------

SIGNED = [
    ("c2pa", "notAllowed", True),
    ("c2pa", "constrained", True),
    ("c2pa", "allowed", False),
    ("cawg", "notAllowed", True),
    ("cawg", "constrained", True),
    ("cawg", "allowed", False),
]


@pytest.mark.parametrize(("namespace", "use", "opts_out"), SIGNED)
@pytest.mark.parametrize(("mime", "image"), [("image/jpeg", jpeg), ("image/png", png)])
def test_training_mining_assertions(
    namespace: str, use: str, opts_out: bool, mime: str, image: object
) -> None:
    signed = c2pa_sign(image(), mime, [training_mining(namespace, use)])  # type: ignore[operator]
    meta = imagemeta.scan_image(signed)
    assert meta.c2pa_store is not None and meta.complete
    assert signals(signed) == {f"{namespace}:training-mining={use}": opts_out}


@pytest.mark.parametrize(
    ("entry", "opts_out"),
    [("ai_generative_training", True), ("data_mining", True), ("ai_inference", False)],
)
def test_which_entries_concern_training(entry: str, opts_out: bool) -> None:
    signed = c2pa_sign(jpeg(), "image/jpeg", [training_mining("cawg", "notAllowed", entry)])
    names = signals(signed)
    if opts_out:
        assert names == {"cawg:training-mining=notAllowed": True}
    else:
        assert names == {}  # inference only: nothing about training


def test_the_strictest_entry_and_both_assertions_count() -> None:
    mixed = training_mining("c2pa", "allowed")
    mixed["data"]["entries"]["c2pa.ai_generative_training"] = {"use": "notAllowed"}
    signed = c2pa_sign(png(), "image/png", [mixed, training_mining("cawg", "allowed")])
    assert signals(signed) == {
        "c2pa:training-mining=notAllowed": True,
        "cawg:training-mining=allowed": False,
    }


def test_a_manifest_spanning_several_jpeg_segments() -> None:
    big = training_mining("cawg", "constrained")
    big["data"]["entries"]["cawg.ai_training"]["constraint_info"] = "x" * 150_000
    signed = c2pa_sign(jpeg(), "image/jpeg", [big])
    assert signed.count(b"\xff\xeb") >= 3  # APP11 segments hold at most 64 KiB each
    for size in (1, 1000):
        meta = feed_in_pieces(signed, size) if size == 1000 else imagemeta.scan_image(signed)
        assert [a.use for a in imagemeta.read_training_mining(meta.c2pa_store or b"")] == [
            "constrained"
        ]


def test_a_damaged_store_is_reported_not_trusted() -> None:
    signed = c2pa_sign(png(), "image/png", [training_mining("c2pa", "notAllowed")])
    meta = imagemeta.scan_image(signed)
    assert meta.c2pa_store is not None
    meta.c2pa_store = meta.c2pa_store[:200]
    assert {s.name for s in imagemeta.image_signals(meta)} == {"c2pa:unreadable"}


@pytest.fixture
def manifest_host() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/manifest.c2pa", hits
    finally:
        server.shutdown()
        server.server_close()


def test_remote_manifests_are_never_fetched(manifest_host: tuple[str, list[str]]) -> None:
    import c2pa

    url, hits = manifest_host
    signed = c2pa_sign(
        jpeg(), "image/jpeg", [training_mining("c2pa", "notAllowed")], remote_url=url
    )
    # The scan finds no embedded store, and records the reference without following it.
    assert signals(signed) == {"c2pa:remote-manifest": False}
    # Even given the whole asset, the gateway's c2pa context does not fetch...
    with pytest.raises(c2pa.C2paError):
        c2pa.Reader("image/jpeg", io.BytesIO(signed), context=imagemeta.c2pa_context())
    assert hits == []
    # ...where a context with remote fetching on would have (so the setting is the real one).
    fetching = c2pa.Context(c2pa.Settings.from_dict({"verify": {"remote_manifest_fetch": True}}))
    with pytest.raises(c2pa.C2paError):
        c2pa.Reader("image/jpeg", io.BytesIO(signed), context=fetching)
    assert hits == ["/manifest.c2pa"]


# -- formats read by packet scanning -----------------------------------------------------------

PACKET_SCANNED = {"avif": avif, "tiff": tiff, "gif": gif, "jxl": jxl}


@pytest.mark.parametrize("name", PACKET_SCANNED)
@pytest.mark.parametrize("chunk", [1, 7, 4096, None])
def test_xmp_in_avif_tiff_and_gif_is_found_by_packet_scanning(name: str, chunk: int | None) -> None:
    body = PACKET_SCANNED[name](xmp_packet("DMI-PROHIBITED-AIMLTRAINING"))
    scanner = imagemeta.ImageMetadataScanner()
    for at in range(0, len(body), chunk or len(body)):
        assert not scanner.feed(body[at : at + (chunk or len(body))])  # to the body's end
    meta = scanner.finish()
    assert meta.complete and not meta.truncated and len(meta.xmp) == 1
    names = [s.name for s in imagemeta.image_signals(meta)]
    assert names == ["iptc-plus:DMI-PROHIBITED-AIMLTRAINING"]
    assert [
        s.name for s in imagemeta.image_signals(imagemeta.scan_image(PACKET_SCANNED[name]()))
    ] == []


@pytest.mark.parametrize(
    "packet",
    [
        # No x:xmpmeta (it is optional), only the wrapper:
        b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><rdf:RDF xmlns:rdf="'
        + RDF_NS.encode()
        + b'"><rdf:Description xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/" '
        b'plus:DataMining="http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED"/></rdf:RDF>'
        b'<?xpacket end="w"?>',
        # No wrapper:
        xmp_packet("DMI-PROHIBITED").split(b"?>", 1)[1].rsplit(b"<?xpacket", 1)[0],
    ],
)
@pytest.mark.parametrize("chunk", [1, 7, 16, None])
def test_a_packet_is_found_by_either_of_its_ends(packet: bytes, chunk: int | None) -> None:
    body = gif(packet)
    scanner = imagemeta.ImageMetadataScanner()
    for at in range(0, len(body), chunk or len(body)):
        scanner.feed(body[at : at + (chunk or len(body))])
    meta = scanner.finish()
    assert [s.name for s in imagemeta.image_signals(meta)] == ["iptc-plus:DMI-PROHIBITED"]
    assert not meta.truncated


def test_a_packet_that_never_ends_is_bounded() -> None:
    body = gif(b"<x:xmpmeta>" + b"x" * (imagemeta.MAX_XMP + 10)) + gif(xmp_packet("DMI-PROHIBITED"))
    meta = imagemeta.scan_image(body)
    assert meta.truncated and len(meta.xmp) == 1  # the next packet is still found
    assert imagemeta.scan_image(gif(b"<x:xmpmeta>" + b"x" * 100)).complete is False


@pytest.mark.parametrize(
    ("name", "mime"), [("avif", "image/avif"), ("tiff", "image/tiff"), ("gif", "image/gif")]
)
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_a_c2pa_store_in_avif_tiff_and_gif_is_found_and_read(
    name: str, mime: str, chunk: int | None
) -> None:
    base = PACKET_SCANNED[name](xmp_packet("DMI-ALLOWED"))
    signed = c2pa_sign(base, mime, [training_mining("c2pa", "notAllowed")])
    scanner = imagemeta.ImageMetadataScanner()
    for at in range(0, len(signed), chunk or len(signed)):
        scanner.feed(signed[at : at + (chunk or len(signed))])
    meta = scanner.finish()
    assert meta.c2pa_store is not None and not meta.c2pa_unread and not meta.truncated
    signals = {s.name: s.opts_out for s in imagemeta.image_signals(meta)}
    assert signals == {"c2pa:training-mining=notAllowed": True, "iptc-plus:DMI-ALLOWED": False}


@pytest.mark.parametrize(
    "body",
    [
        gif(b"no superbox before it: jumdc2pa\x00\x11\x00\x10"),
        tiff() + b"\x00\x00\x00\x01jumb\x00\x00\x00\x20jumdc2pa\x00\x11\x00\x10",  # 64-bit size
    ],
)
def test_a_c2pa_store_not_laid_out_as_expected_is_noticed(body: bytes) -> None:
    meta = imagemeta.scan_image(body)
    assert meta.c2pa_unread and meta.c2pa_store is None and not meta.truncated
    [signal] = imagemeta.image_signals(meta)
    assert (signal.name, signal.opts_out) == ("c2pa:unread", False)


# -- TDMRep in XMP (PDF documents, and any image) ---------------------------------------------


@pytest.mark.parametrize("form", ["attribute", "element"])
def test_a_tdm_reservation_in_xmp_is_read(form: str) -> None:
    facts = imagemeta.read_xmp(tdm_xmp_packet("1", "https://rights.test/tdm.json", form=form))
    assert (facts.tdm.reservation, facts.tdm.policy) == (1, "https://rights.test/tdm.json")
    assert imagemeta.read_xmp(tdm_xmp_packet("0", form=form)).tdm.reservation == 0
    assert imagemeta.read_xmp(tdm_xmp_packet("yes", form=form)).tdm.reservation is None
    broken = tdm_xmp_packet("1", form=form).replace(b"</rdf:RDF>", b"")  # not well-formed
    assert imagemeta.read_xmp(broken).tdm.reservation == 1


def test_a_pdf_with_a_tdm_reservation_is_reserved() -> None:
    reserved = pdf(tdm_xmp_packet("1", "https://rights.test/tdm.json"))
    meta = imagemeta.scan_image(reserved)
    assert meta.format is ImageFormat.PDF and meta.complete
    signals = {s.name: s.opts_out for s in imagemeta.image_signals(meta)}
    assert signals == {"tdm-xmp:reserved": True, "tdm-xmp:policy": False}
    [signal] = [s for s in imagemeta.image_signals(meta) if s.opts_out]
    assert signal.kind is imagemeta.Kind.TDMREP  # so it binds as TDMRep does, by basis
    assert imagemeta.image_signals(imagemeta.scan_image(pdf(tdm_xmp_packet("0")))) != []
    assert imagemeta.image_signals(imagemeta.scan_image(pdf())) == []


@pytest.mark.parametrize(
    ("inner", "values"),
    [
        ('<rdf:Bag><rdf:li rdf:resource="{v}DMI-PROHIBITED"/></rdf:Bag>', ["DMI-PROHIBITED"]),
        (
            "<rdf:Bag><rdf:li>{v}DMI-UNSPECIFIED</rdf:li><rdf:li>{v}DMI-PROHIBITED</rdf:li></rdf:Bag>",
            ["DMI-UNSPECIFIED", "DMI-PROHIBITED"],
        ),
        (
            '<rdf:Alt><rdf:li xml:lang="x-default">{v}DMI-PROHIBITED</rdf:li></rdf:Alt>',
            ["DMI-PROHIBITED"],
        ),
    ],
    ids=["bag-resource", "bag-of-two", "alt"],
)
def test_data_mining_as_an_rdf_container_is_read_item_by_item(
    inner: str, values: list[str]
) -> None:
    # The property holds one URI, but writers put it in a container: each item is a value.
    packet = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="' + RDF_NS + '">'
        '<rdf:Description rdf:about="" xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/">'
        "<plus:DataMining>" + inner.format(v=PLUS_VOCAB) + "</plus:DataMining>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()
    assert imagemeta.read_xmp(packet).data_mining == values
    meta = imagemeta.scan_image(jpeg_with_xmp(packet))
    assert any(s.opts_out for s in imagemeta.image_signals(meta))


def test_an_svgs_xmp_is_read_as_its_text_goes_by() -> None:
    prohibited = svg(xmp_packet("DMI-PROHIBITED-AIMLTRAINING", form="element"))
    meta = imagemeta.scan_image(prohibited)
    assert meta.format is ImageFormat.OTHER  # not by its bytes: by its Content-Type
    scanner = imagemeta.ImageMetadataScanner(svg=True)
    for at in range(0, len(prohibited), 1000):
        scanner.feed(prohibited[at : at + 1000])
    meta = scanner.finish()
    assert meta.format is ImageFormat.SVG and meta.complete
    names = [s.name for s in imagemeta.image_signals(meta) if s.opts_out]
    assert names == ["iptc-plus:DMI-PROHIBITED-AIMLTRAINING"]
    plain = imagemeta.ImageMetadataScanner(svg=True)
    plain.feed(svg())
    assert imagemeta.image_signals(plain.finish()) == []


@pytest.mark.parametrize("on_root", [True, False])
@pytest.mark.parametrize("chunk", [7, 1000, 10**6])
def test_an_svgs_bare_rdf_is_read_with_its_roots_namespaces(on_root: bool, chunk: int) -> None:
    image = inkscape_svg("DMI-PROHIBITED-GENAIMLTRAINING", namespaces_on_root=on_root)
    scanner = imagemeta.ImageMetadataScanner(svg=True)
    for at in range(0, len(image), chunk):
        scanner.feed(image[at : at + chunk])
    meta = scanner.finish()
    names = [s.name for s in imagemeta.image_signals(meta) if s.opts_out]
    assert names == ["iptc-plus:DMI-PROHIBITED-GENAIMLTRAINING"]
    allowed = imagemeta.ImageMetadataScanner(svg=True)
    allowed.feed(inkscape_svg("DMI-ALLOWED"))
    assert not any(s.opts_out for s in imagemeta.image_signals(allowed.finish()))


@pytest.mark.parametrize("chunk", [5, 10**6])
def test_an_svg_with_a_prefixed_root_is_read(chunk: int) -> None:
    # The scan waited for "<svg" before looking for packets: a short SVG whose root is
    # `<s:svg>` ended with its packet unread (found in review).
    packet = xmp_packet("DMI-PROHIBITED")
    for image in (
        b'<s:svg xmlns:s="http://www.w3.org/2000/svg"><s:metadata>'
        + packet
        + b"</s:metadata></s:svg>",
        inkscape_svg("DMI-PROHIBITED")
        .replace(b"<svg ", b"<s:svg ")
        .replace(b"</svg>", b"</s:svg>"),
    ):
        scanner = imagemeta.ImageMetadataScanner(svg=True)
        for at in range(0, len(image), chunk):
            scanner.feed(image[at : at + chunk])
        names = [s.name for s in imagemeta.image_signals(scanner.finish()) if s.opts_out]
        assert names == ["iptc-plus:DMI-PROHIBITED"], image[:60]


def test_an_svg_root_past_the_limit_leaves_packets_to_be_read_as_they_are() -> None:
    image = b"<!--" + b"x" * (80 * 1024) + b"-->" + svg(xmp_packet("DMI-PROHIBITED"))
    scanner = imagemeta.ImageMetadataScanner(svg=True)
    for at in range(0, len(image), 4096):
        scanner.feed(image[at : at + 4096])
        assert len(scanner._buf) <= 64 * 1024 + 4096  # held while the root is looked for
    names = [s.name for s in imagemeta.image_signals(scanner.finish()) if s.opts_out]
    assert names == ["iptc-plus:DMI-PROHIBITED"]


def test_a_tdm_reservation_in_an_images_xmp_counts_too() -> None:
    meta = imagemeta.scan_image(jpeg_with_xmp(tdm_xmp_packet("1")))
    assert [s.name for s in imagemeta.image_signals(meta)] == ["tdm-xmp:reserved"]
