"""The Public Suffix List (the offline copy publicsuffixlist ships): one parse per process, made
when a host is first looked up (~0.1 s of CPU and a few MB each; sites and policy checks share it).

Whether a name the list does not know (`intranet`) counts as a public suffix is asked per lookup
(`accept_unknown`), not fixed per parse.
"""

from __future__ import annotations

from functools import cache

from publicsuffixlist import PublicSuffixList


@cache
def public_suffixes() -> PublicSuffixList:
    return PublicSuffixList()
