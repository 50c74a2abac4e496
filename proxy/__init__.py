"""crawlwarden's governance core: policy, decisions, budgets, opt-outs, fetch log, admin API.

Nothing here imports mitmproxy except `proxy.app`; `addons/` adapts mitmproxy to this package.
"""
