"""mitmproxy as the gateway runs it, minus the gateway: the floor that governance adds to.

The same Master, the same curated addon list (`proxy.app.gateway_addons()`), the same options
(`proxy.app.mitmproxy_options()`) and the same change to mitmproxy's streams
(`addons/stream_release.py`) as `crawlwarden run`, without the crawlwarden addon. The
benchmark reports it beside bare `mitmdump` so that the cost of governance (this -> crawlwarden)
is told apart from the saving of the curated addon list (mitmdump -> this).

Static hosts: the gateway maps *.bench.test to 127.0.0.1 itself; here, as for mitmdump, the load
generator sends the address and keeps the name in Host and SNI.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from addons import mitmproxy_package

mitmproxy_package.without_default_addons()  # as `crawlwarden run` does (proxy/cli.py)

from mitmproxy import options  # noqa: E402
from mitmproxy.master import Master  # noqa: E402

from proxy.app import gateway_addons  # noqa: E402
from proxy.app import mitmproxy_options  # noqa: E402
from proxy.runtime import Settings  # noqa: E402


async def serve(args: argparse.Namespace) -> None:
    settings = Settings(
        policy_file=Path("unused"),
        listen_host="127.0.0.1",
        listen_port=args.port,
        data_dir=Path(args.confdir),
        upstream_trusted_ca=Path(args.trusted_ca) if args.trusted_ca else None,
    )
    Path(args.confdir).mkdir(parents=True, exist_ok=True)
    try:
        from addons import stream_release
    except ImportError:  # an older checkout (--trees) that does not have it
        pass
    else:
        stream_release.install()
    master = Master(options.Options(), with_termlog=False)
    master.addons.add(*gateway_addons())
    master.options.update(**mitmproxy_options(settings))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.shutdown)
    await master.run()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--confdir", required=True)
    p.add_argument("--trusted-ca", default=None)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
