"""The gateway imports the six mitmproxy addons it runs, not mitmproxy's registry of ~30."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import Gateway
from tests.support import policy_with

_LOADED = """
import sys
from addons import mitmproxy_package
{before}
print(mitmproxy_package.without_default_addons())
from proxy.app import gateway_addons
print(" ".join(sorted(m for m in sys.modules if m.startswith("mitmproxy.addons."))))
"""


def _imports(before: str = "") -> tuple[str, set[str]]:
    out = subprocess.run(
        [sys.executable, "-O", "-c", _LOADED.format(before=before)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    ).stdout.split("\n")
    return out[0], set(out[1].split())


def test_only_the_addons_the_gateway_runs_are_imported():
    done, loaded = _imports()
    assert done == "True"
    ran = {"core", "disable_h2c", "errorcheck", "next_layer", "proxyserver", "tlsconfig"}
    assert {f"mitmproxy.addons.{name}" for name in ran} <= loaded, loaded
    # (termlog: mitmproxy's Master imports it itself.) Was every one of them, and the flow
    # filter grammar and werkzeug through them.
    assert len(loaded) <= len(ran) + 3, loaded
    assert "mitmproxy.addons.blocklist" not in loaded


def test_a_package_already_imported_is_left_whole():
    done, loaded = _imports(before="import mitmproxy.addons")
    assert done == "False"
    assert "mitmproxy.addons.blocklist" in loaded


def test_the_running_gateway_imports_only_them(workdir: Path):
    # `python -v` says every module a process imports (on stderr: the gateway's log here).
    with Gateway(workdir, policy_with(), env={"PYTHONVERBOSE": "1"}) as gw:
        log = gw.logs()
    assert "import 'mitmproxy.addons.proxyserver'" in log
    assert "import 'mitmproxy.addons.blocklist'" not in log
    assert "import 'mitmproxy.flowfilter'" not in log
