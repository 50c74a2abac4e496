"""The text of an HTTP/2 frame's data, made from the bytes it shows.

h2 puts every frame it receives into a trace line, whether or not anything logs it
(`H2Connection._receive_frame` calls `repr(frame)` first), and hyperframe's text of a frame's
data hex-encodes all of it, then keeps 20 hex digits: each 16 KiB DATA frame of a download
through the gateway, to the site and to an HTTP/2 scraper, was copied and hex-encoded whole for
a string no one reads, ~5 % of the gateway's CPU on an HTTP/2 download (py-spy). The same text
is now made from the first 10 bytes.

Installed once at start-up by the gateway (proxy/app.py); only where hyperframe's function still
reads as this assumes.
"""

from __future__ import annotations

import binascii
import inspect

from hyperframe import frame

from addons.patches import install_once

_SHOWN = 10  # bytes of the data hyperframe's text shows (20 hex digits)


def _looks_as_expected() -> bool:
    original = getattr(frame, "_raw_data_repr", None)
    if original is None:
        return False
    source = inspect.getsource(original)
    return 'r = binascii.hexlify(data).decode("ascii")' in source and 'r[:20] + "..."' in source


def raw_data_repr(data: bytes | memoryview | None) -> str:
    """hyperframe's `_raw_data_repr`, the same text for any data, in constant time."""
    if not data:
        return "None"
    shown = binascii.hexlify(data[:_SHOWN]).decode("ascii")
    return "<hex:" + shown + ("..." if len(data) > _SHOWN else "") + ">"


@install_once(_looks_as_expected)
def install() -> None:
    """Make hyperframe's data text from the bytes it shows (once per process)."""
    frame._raw_data_repr = raw_data_repr
