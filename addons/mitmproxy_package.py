"""mitmproxy's addons package without its registry of default addons.

`mitmproxy/addons/__init__.py` imports all ~30 of mitmproxy's addons (and with them its flow
filter grammar, werkzeug, ...) to offer `default_addons()`, which the gateway does not use: it runs
six of them (`proxy.app.gateway_addons`). Putting the package in place without running that file
makes importing those six load only them: ~270 fewer modules, ~12 MB less memory per replica and
~0.3-0.9 s less CPU at each start on the benchmark's host (bench/README.md, stop 33).

Call `without_default_addons()` before anything imports `mitmproxy.addons`; if something already
has, the package is left as it is (everything still works, it is only heavier).
"""

from __future__ import annotations

import importlib.util
import sys

PACKAGE = "mitmproxy.addons"


def without_default_addons() -> bool:
    """Whether the package now stands without its registry (False: already imported, or not a
    package as expected; then it is imported the usual way on first use)."""
    if PACKAGE in sys.modules:
        return False
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return False
    # A package module with its __path__ and no code run: `from mitmproxy.addons import core`
    # then imports the submodule alone.
    sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
    return True
