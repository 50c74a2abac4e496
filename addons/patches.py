"""Changes the gateway makes to mitmproxy's classes at start-up (addons/stream_release.py,
addons/interim.py): each made once per process, and only where the running mitmproxy still
looks as the change assumes (else nothing is changed, and the caller says so).

The checks run at every start and read the source of the functions a change relies on, never of
a whole class: inspect.getsource of a class parses its whole module (25-160 ms each; the six
classes they once read cost ~0.2 s of each start's ~2.2 s of CPU). tests/test_patch_guards.py
holds them to that."""

from __future__ import annotations

import functools
from collections.abc import Callable


def install_once(
    looks_as_expected: Callable[[], bool],
) -> Callable[[Callable[[], None]], Callable[[], bool]]:
    """Make `apply` an `install()`: True once applied (a second call is a no-op), False if
    mitmproxy does not look as expected (nothing applied)."""

    def wrap(apply: Callable[[], None]) -> Callable[[], bool]:
        done = False

        @functools.wraps(apply)
        def install() -> bool:
            nonlocal done
            if done:
                return True
            if not looks_as_expected():
                return False
            apply()
            done = True
            return True

        return install

    return wrap
