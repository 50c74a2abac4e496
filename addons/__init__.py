"""mitmproxy addons: thin adapters from mitmproxy hooks to the decisions of `proxy`."""
