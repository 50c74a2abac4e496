"""The checks that mitmproxy (h2, wsproto) still look as the gateway's patches assume.

Each start runs them all (addons/patches.py install_once). They read the source of the functions
they rely on; the source of a class costs a parse of its whole module (25-160 ms each on a slow
host, ~0.3-0.5 s a start for the six classes they once read), so they read methods only.

The guards run in a fresh interpreter, as at a start: in this one another test may have installed
a patch already, and a guard rightly says no to a function the gateway itself replaced.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from typing import Any

import pytest

import addons
from addons import mitmproxy_package

mitmproxy_package.without_default_addons()

_PROGRAM = r"""
import importlib, inspect, json, pkgutil, sys

import addons
from addons import mitmproxy_package

mitmproxy_package.without_default_addons()
getsource = inspect.getsource
read = []

def recording(obj):
    read.append(obj)
    return getsource(obj)

inspect.getsource = recording
found = {}
for info in pkgutil.iter_modules(addons.__path__):
    guard = getattr(importlib.import_module("addons." + info.name), "_looks_as_expected", None)
    if not callable(guard):
        continue
    read.clear()
    says = guard()
    classes = [obj.__qualname__ for obj in read if inspect.isclass(obj)]
    found[info.name] = {"says": says, "classes": classes, "read": len(read)}
json.dump(found, sys.stdout)
"""


def _guarded() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.iter_modules(addons.__path__)
        if callable(
            getattr(importlib.import_module(f"addons.{info.name}"), "_looks_as_expected", None)
        )
    )


@pytest.fixture(scope="module")
def guards() -> dict[str, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, dict[str, Any]] = json.loads(done.stdout)
    return found


GUARDED = _guarded()


def test_every_patch_has_its_guard(guards: dict[str, dict[str, Any]]):
    # (so that the test below covers them: a module that patches mitmproxy's classes says so
    # with install_once and its _looks_as_expected)
    assert (
        {
            "buffered_bytes",
            "connection_tasks",
            "h2_frames",
            "read_backpressure",
            "stream_release",
            "stream_window",
            "websocket_limit",
        }
        <= set(GUARDED)
        == set(guards)
    )


@pytest.mark.parametrize("name", GUARDED)
def test_a_guard_reads_functions_not_whole_classes(name: str, guards: dict[str, dict[str, Any]]):
    guard = guards[name]
    assert guard["says"] is True, f"{name}: mitmproxy no longer looks as its patch assumes"
    assert guard["read"] > 0, f"{name}'s guard reads no source"
    assert not guard["classes"], f"{name} reads the source of the classes {guard['classes']}"
