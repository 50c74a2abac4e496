"""addons/h2_frames.py: hyperframe's text of a frame's data, made from the bytes it shows."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest
from hyperframe import frame

from addons import h2_frames


def _hyperframes_own() -> Callable[[Any], str]:
    """hyperframe's `_raw_data_repr` as it ships (a fresh copy of its module: the gateway's
    start replaces the function in the loaded one)."""
    spec = importlib.util.find_spec("hyperframe.frame")
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    own: Callable[[Any], str] = fresh._raw_data_repr
    return own


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 20, 16_384])
@pytest.mark.parametrize("kind", [bytes, memoryview])
def test_the_text_is_hyperframes_own(size: int, kind: type) -> None:
    data = kind(bytes(range(256)) * (size // 256) + bytes(range(size % 256)))
    assert h2_frames.raw_data_repr(data) == _hyperframes_own()(data)


def test_no_data_is_none_as_in_hyperframe() -> None:
    assert h2_frames.raw_data_repr(None) == _hyperframes_own()(None) == "None"


def test_a_data_frame_reads_as_before_once_installed() -> None:
    # Pinned: if hyperframe's function changes, the gateway leaves it (and says so at start).
    assert h2_frames._looks_as_expected()
    data = frame.DataFrame(1, data=b"\x00\x01" * 9000, flags=["END_STREAM"])
    before = _hyperframes_own()(data.serialize_body())
    assert h2_frames.install() and h2_frames.install()
    assert repr(data) == f"DataFrame(stream_id=1, flags=['END_STREAM']): {before}"
    assert before == "<hex:00010001000100010001...>"
