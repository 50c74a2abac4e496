"""The checks that mitmproxy (h2, wsproto) still look as the gateway's patches assume.

Each start runs them all (addons/patches.py install_once). They read the source of the functions
they rely on; the source of a class costs a parse of its whole module (25-160 ms each on a slow
host, ~0.3-0.5 s a start for the six classes they once read), so they read methods only.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

import pytest

import addons
from addons import mitmproxy_package

mitmproxy_package.without_default_addons()


def _guards() -> dict[str, Callable[[], bool]]:
    found = {}
    for info in pkgutil.iter_modules(addons.__path__):
        module = importlib.import_module(f"addons.{info.name}")
        guard = getattr(module, "_looks_as_expected", None)
        if callable(guard):
            found[info.name] = guard
    return found


GUARDS = _guards()


def test_every_patch_has_its_guard():
    # (so that the test below covers them: a module that patches mitmproxy's classes says so
    # with install_once and its _looks_as_expected)
    assert {
        "buffered_bytes",
        "connection_tasks",
        "read_backpressure",
        "stream_release",
        "stream_window",
        "websocket_limit",
    } <= set(GUARDS)


@pytest.mark.parametrize("name", sorted(GUARDS))
def test_a_guard_reads_functions_not_whole_classes(name: str, monkeypatch: pytest.MonkeyPatch):
    read: list[Any] = []
    getsource = inspect.getsource

    def recording(obj: Any) -> str:
        read.append(obj)
        return getsource(obj)

    monkeypatch.setattr(inspect, "getsource", recording)
    assert GUARDS[name]() is True
    classes = [obj.__qualname__ for obj in read if inspect.isclass(obj)]
    assert not classes, f"{name} reads the source of the classes {classes}: read their methods"
